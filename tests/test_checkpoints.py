"""Saving, loading, sharded checkpoints, and clear errors for bad checkpoints and inputs."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import metalcandle as mc
from conftest import ATOL_FORWARD, MODELS


def copy_model(fixtures, name, dst):
    shutil.copytree(fixtures / name, dst)
    return dst


@pytest.mark.parametrize("name", MODELS)
def test_save_pretrained_round_trip(fixtures, tmp_path, name):
    model = mc.load_model(fixtures / name)
    model.save_pretrained(tmp_path / "out")
    # Same names, shapes and values as the original file (GPT-2's Conv1D layout restored).
    orig, saved = (
        load_file(fixtures / name / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert sorted(orig) == sorted(saved)
    for k in orig:
        np.testing.assert_array_equal(orig[k], saved[k])
    again = mc.load_model(tmp_path / "out")
    ids = np.load(fixtures / name / "golden.npz")["input_ids"]
    np.testing.assert_array_equal(again.forward(ids), model.forward(ids))


def test_sharded_checkpoint(fixtures, tmp_path):
    src = fixtures / "tiny-llama"
    dst = tmp_path / "sharded"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, dst / fname)
        weight_map.update({k: fname for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    g = np.load(src / "golden.npz")
    np.testing.assert_allclose(
        mc.load_model(dst).forward(g["input_ids"]), g["logits"], atol=ATOL_FORWARD, rtol=0
    )


def test_bf16_checkpoint_is_converted_to_f32(fixtures, tmp_path):
    # bf16 is the top half of an f32: truncate the fixture's weights and compare with the
    # same truncation done in f32.
    dst = copy_model(fixtures, "tiny-llama", tmp_path / "bf16")
    t = load_file(dst / "model.safetensors")
    bits = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in t.items()}
    header = {k: {"dtype": "BF16", "shape": list(v.shape)} for k, v in bits.items()}
    offset, blobs = 0, []
    for k in sorted(bits):
        b = bits[k].tobytes()
        header[k]["data_offsets"] = [offset, offset + len(b)]
        offset += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    (dst / "model.safetensors").write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))
    truncated = {k: (v.astype(np.uint32) << 16).view(np.float32) for k, v in bits.items()}
    ref = tmp_path / "ref"
    copy_model(fixtures, "tiny-llama", ref)
    save_file(truncated, ref / "model.safetensors")
    ids = np.load(fixtures / "tiny-llama" / "golden.npz")["input_ids"]
    np.testing.assert_array_equal(mc.load_model(dst).forward(ids), mc.load_model(ref).forward(ids))


def test_missing_unexpected_and_misshapen_tensors_reported_together(fixtures, tmp_path):
    dst = copy_model(fixtures, "tiny-qwen2", tmp_path / "bad")
    t = load_file(dst / "model.safetensors")
    del t["model.layers.0.self_attn.q_proj.weight"]
    t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:, :10].copy()
    t["model.extra.weight"] = np.zeros(3, dtype=np.float32)
    save_file(t, dst / "model.safetensors")
    with pytest.raises(ValueError) as e:
        mc.load_model(dst)
    msg = str(e.value)
    assert "3 problem" in msg
    assert "missing tensor `model.layers.0.self_attn.q_proj.weight`" in msg
    assert "model.layers.1.mlp.up_proj.weight" in msg and "[160, 10]" in msg
    assert "unexpected tensor `model.extra.weight`" in msg


def test_config_errors_name_the_key(fixtures, tmp_path):
    dst = copy_model(fixtures, "tiny-llama", tmp_path / "cfg")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "bert"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json.*model_type.*unsupported architecture `bert`"):
        mc.load_model(dst)
    del cfg["num_attention_heads"]
    cfg["model_type"] = "llama"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_attention_heads.*missing"):
        mc.load_model(dst)
    (dst / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        mc.load_model(dst)


def test_missing_and_corrupt_files(fixtures, tmp_path):
    with pytest.raises(FileNotFoundError):
        mc.load_model(tmp_path / "nowhere")
    dst = copy_model(fixtures, "tiny-gpt2", tmp_path / "corrupt")
    (dst / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors.*not a readable safetensors"):
        mc.load_model(dst)
    (dst / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        mc.load_model(dst)


def test_bad_inputs_raise_clear_python_errors(fixtures):
    model = mc.load_model(fixtures / "tiny-qwen2")
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 400\)"):
        model.forward(np.array([[1, 2, 400]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward(np.array([[-1]]))
    with pytest.raises(TypeError, match="integers"):
        model.forward(np.array([[1.5]]))
    with pytest.raises(ValueError, match="2-D"):
        model.forward(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="empty"):
        model.forward(np.zeros((1, 0), dtype=np.int64))
    with pytest.raises(ValueError, match="attention_mask"):
        model.forward(np.array([[1, 2]]), attention_mask=np.array([[1, 1, 1]]))
    gpt2 = mc.load_model(fixtures / "tiny-gpt2")
    with pytest.raises(ValueError, match="beyond the model's 128 learned positions"):
        gpt2.forward(np.zeros((1, 129), dtype=np.int64))
