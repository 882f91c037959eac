"""Hostile and broken inputs: names that would escape their folder, sizes that would exhaust memory,
loaders' strictness, error kinds and messages, and a chat whose kept history stays in its budget."""

import json
import os
import re
import shutil
import struct

import numpy as np
import pytest

import metalcandle as mc
from conftest import run_cli, write_config, write_corpus
from metalcandle import data as D
from metalcandle.config import load_config
from metalcandle.errors import UserError
from metalcandle.registry import Registry
from metalcandle.tokenizers import CharTokenizer, load_tokenizer

IDS = np.array([[1, 5, 9, 2, 7]], dtype=np.int64)

# --- 1. names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs-escape", "a/b", ".", "bad\nname", "x" * 101, ""])
def test_import_model_refuses_names_that_are_not_plain(tmp_path, capsys, fixtures, name):
    models = tmp_path / "models"
    code, _, err = run_cli(
        capsys, "import-model", fixtures / "tiny-qwen2", "--name", name, "--models-dir", models
    )
    assert code == 2 and "not a plain name" in err
    assert not (tmp_path / "escape").exists() and not models.exists()


def test_run_name_must_be_plain(tmp_path):
    write_corpus(tmp_path)
    cfg = write_config(tmp_path / "run.toml", "ok", tmp_path / "out", tmp_path / "models")
    assert load_config(cfg)["run"]["name"] == "ok"
    with pytest.raises(UserError, match=r"run.name '../../evil' is not a plain name"):
        load_config(cfg, ["run.name=../../evil"])


def test_registry_paths_read_back_stay_in_the_registry(tmp_path):
    reg = Registry(tmp_path)
    reg.register({"model_name": "m"})
    assert reg.get("m")["path"] == str(tmp_path / "m")
    data = json.loads((tmp_path / "registry.json").read_text())
    data["models"]["m"]["path"] = "/etc"
    (tmp_path / "registry.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"registry.json: entry 'm' has path '/etc'"):
        reg.get("m")
    data["models"] = {"../x": {"model_name": "../x", "path": str(tmp_path / "../x")}}
    (tmp_path / "registry.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="registry.json: .*not a plain name"):
        reg.entries()


def test_registry_lookups_and_model_name_take_plain_names_only(tmp_path):
    write_corpus(tmp_path)
    cfg = write_config(tmp_path / "run.toml", "ok", tmp_path / "out", tmp_path / "models")
    with pytest.raises(UserError, match=r"model.name '../x' is not a plain name: use 1 to 100 letters"):
        load_config(cfg, ["model.name=../x"])
    with pytest.raises(UserError, match=r"model name '/etc' is not a plain name"):
        Registry(tmp_path / "models").get("/etc")


PLAIN = r"is not a plain name: use 1 to 100 letters, digits, '\.', '_' and '-'"
NOT_PLAIN = ["../x", "a/b", ".", "bad\nname", "x" * 300, "./x", "Qwen/Qwen2.5-0.5B"]


def _adapter(fixtures, folder, base=None, meta_base=None):
    """The fixture PEFT adapter of tiny-qwen2 copied to `folder`, its adapter_config.json's
    base_model_name_or_path set to `base` (None: the fixture's own "tiny-qwen2"), with a
    metadata.json naming `meta_base` when given."""
    shutil.copytree(fixtures / "tiny-qwen2" / "lora" / "adapter_final", folder)
    if base is not None:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(cfg | {"base_model_name_or_path": base}))
    if meta_base is not None:
        (folder / "metadata.json").write_text(json.dumps({"base_model_path": meta_base}))
    return folder


@pytest.mark.parametrize("key", ["base_model_name_or_path", "base_model_path"])
@pytest.mark.parametrize("name", NOT_PLAIN)
def test_adapter_base_given_relatively_must_be_a_plain_registry_name(
    fixtures, tmp_path, monkeypatch, key, name
):
    from metalcandle.loading import load_folder_tokenizer, load_model_dir

    # "../x" reaches a base from the working folder, where a relative value once resolved.
    (tmp_path / "x").symlink_to(fixtures / "tiny-qwen2", target_is_directory=True)
    meta = key == "base_model_path"
    adapter = _adapter(fixtures, tmp_path / "adapter", None if meta else name, name if meta else None)
    monkeypatch.chdir(adapter)
    file = "metadata.json" if meta else "adapter_config.json"
    for load in (load_model_dir, load_folder_tokenizer):
        with pytest.raises(UserError) as e:
            load(adapter, models_dir=tmp_path / "models")
        message = str(e.value)
        assert f"{file}: {key} (an absolute folder or a registry model's name) " in message
        assert re.search(PLAIN, message), message


def test_adapter_base_by_registry_name_or_absolute_folder(fixtures, tmp_path, capsys, monkeypatch):
    from metalcandle.loading import load_model_dir

    base = mc.load_model(fixtures / "tiny-qwen2")
    base.load_adapter(fixtures / "tiny-qwen2" / "lora" / "adapter_final")
    want = base.forward(IDS)
    models = tmp_path / "models"
    adapter = _adapter(fixtures, tmp_path / "adapter")  # PEFT's base_model_name_or_path = "tiny-qwen2"
    with pytest.raises(UserError, match=r"base model 'tiny-qwen2' is not in the registry .*import-model"):
        load_model_dir(adapter, models_dir=models)

    # A plain name is a registry model: the one in models_dir, or ($METALCANDLE_MODELS_DIR) the default.
    code, _, err = run_cli(capsys, "import-model", fixtures / "tiny-qwen2", "--models-dir", models)
    assert code == 0, err
    np.testing.assert_array_equal(load_model_dir(adapter, models_dir=models).forward(IDS), want)
    monkeypatch.setenv("METALCANDLE_MODELS_DIR", str(models))
    np.testing.assert_array_equal(load_model_dir(adapter).forward(IDS), want)

    # An adapter registered in a registry finds its base in that registry.
    monkeypatch.setenv("METALCANDLE_MODELS_DIR", str(tmp_path / "elsewhere"))
    registered = _adapter(fixtures, models / "tuned")
    Registry(models).register({"model_name": "tuned", "fine_tuned_from": "tiny-qwen2"})
    np.testing.assert_array_equal(load_model_dir(registered).forward(IDS), want)

    # An absolute path is the folder the adapter was trained on, as it is.
    absolute = _adapter(fixtures, tmp_path / "abs", meta_base=str(fixtures / "tiny-qwen2"))
    np.testing.assert_array_equal(load_model_dir(absolute).forward(IDS), want)
    (absolute / "metadata.json").write_text(json.dumps({"base_model_path": str(tmp_path / "nowhere")}))
    with pytest.raises(UserError, match=r"metadata.json: base_model_path: .* folder .*nowhere is not found"):
        load_model_dir(absolute)
    (absolute / "metadata.json").write_text(json.dumps({"base_model_path": 5}))
    with pytest.raises(UserError, match=r"LoRA adapter without its base model .* got 5"):
        load_model_dir(absolute)


# --- 4. sizes checked before allocating ----------------------------------------------------------


def _custom(**kw):
    cfg = {
        "model_type": "custom-transformer",
        "vocab_size": 10,
        "d_model": 8,
        "n_layers": 1,
        "n_heads": 2,
        "d_ff": 16,
        "max_seq_len": 8,
    }
    return cfg | kw


@pytest.mark.parametrize(
    ("field", "value"), [("vocab_size", 10**9), ("d_model", 10**9 // 2 * 2), ("n_layers", 10**6)]
)
def test_from_config_refuses_what_cannot_fit(field, value):
    with pytest.raises(ValueError, match="(vocab_size|num_hidden_layers|n_layers)"):
        mc.Model.from_config(_custom(**{field: value}))


def test_lora_rank_beyond_memory_is_refused(fixtures, tmp_path):
    model = mc.load_model(fixtures / "tiny-qwen2")
    with pytest.raises(ValueError, match="key `r`.*GiB"):
        model.add_lora(r=10**9)
    with pytest.raises(ValueError, match="r must be > 0 and an integer"):
        model.add_lora(r=1.5)
    assert not model.has_adapter
    adapter = tmp_path / "a"
    shutil.copytree(fixtures / "tiny-qwen2" / "lora" / "adapter_final", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    for value in (10**9, 2**64, 1.5):
        (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"r": value}))
        with pytest.raises(ValueError, match="adapter_config.json"):
            model.load_adapter(adapter)
        assert not model.has_adapter


_LOAD_AND_REPORT_PEAK = """
import resource, sys
import metalcandle as mc
model = mc.load_model(sys.argv[1])
try:
    model.load_adapter(sys.argv[2])
except ValueError as e:
    print("ValueError:", e)
print("peak MiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_adapter_tensors_are_checked_before_the_rank_allocates(fixtures, tmp_path):
    # r = 2^20 fits this machine's memory (about 9 GiB of adapters for tiny-qwen2), so only the
    # order of the checks keeps the load small: the file's tensors are read before anything else.
    import subprocess
    import sys

    adapter = tmp_path / "a"
    shutil.copytree(fixtures / "tiny-qwen2" / "lora" / "adapter_final", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"r": 2**20}))
    header = b"{}"
    (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    out = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_REPORT_PEAK, fixtures / "tiny-qwen2", adapter],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "adapter_model.safetensors" in out and "missing tensor" in out, out
    assert int(out.rsplit("peak MiB", 1)[1]) < 1024, out


def test_char_tokenizer_encodes_in_chunks_exactly():
    text = ("ab<unk>c<|endoftext|>dé\n" * 50) + "<|endof"
    whole = CharTokenizer().encode(text)
    chunked = CharTokenizer()
    chunked.ENCODE_CHUNK = 7  # cuts land inside special-token strings often
    assert chunked.encode(text) == whole
    assert sum(chunked.unknown_counts.values()) == 50


def test_beam_count_beyond_memory_is_refused(fixtures):
    model = mc.load_model(fixtures / "tiny-qwen2")
    with pytest.raises(ValueError, match="num_beams=.*GiB"):
        model.generate([[1, 2]], max_new_tokens=4, num_beams=10**12)


# --- 5. loader strictness ------------------------------------------------------------------------


def _sharded(fixtures, tmp_path, shard_name):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(fixtures / "tiny-qwen2" / "config.json", d)
    blob = (fixtures / "tiny-qwen2" / "model.safetensors").read_bytes()
    names = [k for k in json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]]) if k != "__metadata__"]
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(names, shard_name)})
    )
    return d


@pytest.mark.parametrize(
    "shard", ["../outside/x.safetensors", "/tmp/x.safetensors", "sub/../../x.safetensors"]
)
def test_shard_index_paths_stay_in_the_folder(fixtures, tmp_path, shard):
    with pytest.raises(ValueError, match="index.json.*must be a file name inside"):
        mc.load_model(_sharded(fixtures, tmp_path, shard))


def test_shard_that_is_a_fifo_is_refused_without_blocking(fixtures, tmp_path):
    d = _sharded(fixtures, tmp_path, "fifo.safetensors")
    os.mkfifo(d / "fifo.safetensors")
    with pytest.raises(ValueError, match="not a regular file"):
        mc.load_model(d)


def test_safetensors_trailing_bytes_are_refused(fixtures, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fixtures / "tiny-qwen2", d)
    with open(d / "model.safetensors", "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(ValueError, match="model.safetensors.*the file has"):
        mc.load_model(d)


def test_pickle_checkpoints_are_refused_with_a_hint(fixtures, tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(fixtures / "tiny-qwen2" / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match="pytorch_model.bin.*convert it to safetensors"):
        mc.load_model(d)


# --- 3. error types ------------------------------------------------------------------------------


def test_invalid_config_json_is_a_value_error_naming_the_file(fixtures, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(fixtures / "tiny-qwen2", d)
    (d / "config.json").write_text('{"vocab_size": NaN}')
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        mc.load_model(d)


def test_core_errors_keep_their_kind(fixtures, tmp_path):
    model = mc.load_model(fixtures / "tiny-qwen2")
    with pytest.raises(ValueError, match=r"input_ids\[0, 1\] = 400 is outside the vocabulary \[0, 400\)"):
        model.forward([[1, model.vocab_size]])
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        model._core.forward_cached(np.array([[-1]], dtype=np.int64), model._core.new_cache())

    d = tmp_path / "m"
    shutil.copytree(fixtures / "tiny-qwen2", d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match=r"config.json: key `hidden_size`: missing") as e:
        mc.load_model(d)
    assert not isinstance(e.value, OSError | RuntimeError)
    (d / "config.json").write_text(json.dumps(config | {"num_attention_heads": "four"}))
    with pytest.raises(ValueError, match=r"config.json: key `num_attention_heads`"):
        mc.load_model(d)

    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model.safetensors"):
        mc.load_model(d)
    adapter = _adapter(fixtures, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model.safetensors"):
        mc.load_model(fixtures / "tiny-qwen2").load_adapter(adapter)
    (adapter / "adapter_config.json").unlink()
    (adapter / "adapter_config.json").mkdir()  # a folder where a file should be: an OSError
    with pytest.raises(OSError, match=r"adapter_config.json") as e:
        mc.load_model(fixtures / "tiny-qwen2").load_adapter(adapter)
    assert not isinstance(e.value, FileNotFoundError)


def test_corrupt_tokenizer_files_name_the_file(fixtures, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(fixtures / "tokenizer", d)
    (d / "tokenizer.json").write_text('{1: "x"}')
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(d)
    shutil.copy(fixtures / "tokenizer" / "tokenizer.json", d)
    (d / "tokenizer_config.json").write_text('{"chat_template": 5}')
    with pytest.raises(ValueError, match="tokenizer_config.json: chat_template must be a string"):
        load_tokenizer(d)


# --- 7. messages ---------------------------------------------------------------------------------


def test_data_and_config_messages_name_the_file(tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:2: not UTF-8"):
        D.read_examples([bad], "auto", CharTokenizer(), True)
    chat = tmp_path / "c.jsonl"
    chat.write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    with pytest.raises(UserError, match=r"c.jsonl:1: message role 'wizard'"):
        D.read_examples([chat], "auto", CharTokenizer(), True)
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(UserError, match=r"c.jsonl: chat rows .* need a tokenizer with a chat template"):
        D.read_examples([chat], "auto", CharTokenizer(), True)
    toml = tmp_path / "r.toml"
    toml.write_text("run = 5\n")
    with pytest.raises(UserError, match=r"r.toml: \[run\] must be a table"):
        load_config(toml)


def test_output_dir_that_is_a_file(tmp_path, capsys):
    write_corpus(tmp_path)
    (tmp_path / "out").write_text("")
    cfg = write_config(tmp_path / "run.toml", "f", tmp_path / "out", tmp_path / "models")
    code, _, err = run_cli(capsys, "train", cfg, "--quiet")
    assert code == 2 and "run.output_dir" in err and "not a folder" in err


def test_trainer_inputs_are_checked_like_forward(fixtures):
    model = mc.load_model(fixtures / "tiny-qwen2")
    trainer = mc.Trainer(model, mc.AdamW(lr=1e-3))
    ids = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"labels\[0, 1\] = 99999 is outside the vocabulary"):
        trainer.step(ids, labels=np.array([[1, 99999, -100]]))
    with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
        model.forward(np.array([[1, 2]]), attention_mask=np.array([[5, -1]]))
    with pytest.raises(ValueError, match="max_grad_norm"):
        mc.Trainer(model, mc.AdamW(lr=1e-3), max_grad_norm=float("nan"))


# --- 6. adapter fields ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("rank_pattern", {"q_proj": 4}, "rank_pattern"),
        ("alpha_pattern", {"q_proj": 4}, "alpha_pattern"),
        ("exclude_modules", ["k_proj"], "exclude_modules"),
        ("fan_in_fan_out", True, "fan_in_fan_out"),
        ("modules_to_save", ["lm_head"], "modules_to_save"),
        ("bias", "all", "bias"),
        ("use_rslora", "yes", "use_rslora"),
        ("lora_dropout", 5, "lora_dropout"),
        ("lora_dropout", "x", "lora_dropout"),
        ("target_modules", ["nothing_of_this_model"], "target_modules"),
    ],
)
def test_adapter_fields_that_would_be_ignored_are_refused(fixtures, tmp_path, field, value, match):
    model = mc.load_model(fixtures / "tiny-qwen2")
    adapter = tmp_path / "a"
    shutil.copytree(fixtures / "tiny-qwen2" / "lora" / "adapter_final", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    model.load_adapter(adapter)  # as saved, it loads
    model.remove_adapter()
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {field: value}))
    with pytest.raises(ValueError, match=f"adapter_config.json: key `{match}`"):
        model.load_adapter(adapter)


# --- 2. bounded chat -----------------------------------------------------------------------------


def test_chat_history_fits_the_context_after_every_reply(fixtures):
    from metalcandle.chat import InteractivePrompt

    model = mc.load_model(fixtures / "tiny-qwen2")
    tok = load_tokenizer(fixtures / "tiny-qwen2")
    chat = InteractivePrompt(model, tok, max_context_length=96, system_prompt="Be brief.", max_new_tokens=40)
    for text in [
        "Hello there, how are you today?",
        "Tell me a story.",
        "And another one, longer.",
        "Thanks!",
    ]:
        chat.send_message(text)
        assert chat.context_token_count() <= 96
        assert chat.history[0] == {"role": "system", "content": "Be brief."}
        assert chat.history[-2] == {"role": "user", "content": text}


# --- Also: a kill during any write leaves the old file or the new one ----------------------------

_WRITER = """
import sys, itertools
import metalcandle as mc
from metalcandle.registry import Registry
from metalcandle.tokenizers import load_tokenizer
kind, src, out = sys.argv[1:]
model = mc.load_model(src)
if kind == "adapter":
    model.add_lora(r=4)
if kind == "quantized":
    from metalcandle.quantize import quantize_model
    quantize_model(model, "q8_0")
tok = load_tokenizer(src)
print("ready", flush=True)
for i in itertools.count():
    if kind == "registry":
        Registry(out).register({"model_name": f"m{i}", "license": "x" * 100000})
    elif kind == "adapter":
        model.save_adapter(out)
    elif kind in ("gguf", "quantized"):
        model.save_gguf(out + "/model.gguf", tok)
    else:
        model.save_pretrained(out)
"""


@pytest.mark.parametrize("kind", ["registry", "adapter", "gguf", "quantized", "checkpoint"])
def test_kill_during_a_write_leaves_a_whole_file(fixtures, tmp_path, kind):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    rng = np.random.default_rng(0)
    for _ in range(3):
        p = subprocess.Popen(
            [sys.executable, "-c", _WRITER, kind, str(fixtures / "tiny-qwen2"), str(out)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.2 + rng.random() * 0.8)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if kind == "registry":
            assert Registry(out).entries()  # parses, with every entry whole
        elif kind == "adapter":
            if (out / "adapter_config.json").exists():
                m = mc.load_model(fixtures / "tiny-qwen2")
                m.load_adapter(out)
        elif kind in ("gguf", "quantized"):
            if (out / "model.gguf").exists():
                mc.load_model(out / "model.gguf")
        elif (out / "config.json").exists():
            mc.load_model(out)
