"""Data-parallel training on MPI: `mpiexec -n 2` on this machine against one process.

Needs mpi4py and mpiexec (`pip install "metalcandle[mpi]"`); with METALCANDLE_REQUIRE_MPI=1 (as CI
sets it) their absence is a failure, not a skip."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import metalcandle as mc
from conftest import write_config, write_corpus
from metalcandle import checkpoint as ck
from test_train_loop import LORA, chat_rows

TIMEOUT = 300  # seconds per mpiexec job: a hung rank fails the test instead of the suite
STEPS = 20
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))


@pytest.fixture(autouse=True)
def mpi_available():
    missing = [
        what for what, ok in (("mpi4py", importlib.util.find_spec("mpi4py")), ("mpiexec", MPIEXEC)) if not ok
    ]
    if missing:
        msg = f"{' and '.join(missing)} not installed (pip install mpich mpi4py)"
        if os.environ.get("METALCANDLE_REQUIRE_MPI") == "1":
            pytest.fail(f"METALCANDLE_REQUIRE_MPI=1 but {msg}")
        pytest.skip(msg)


def ranks(n, *argv, cwd=None):
    """`mpiexec -n N python -m metalcandle ARGV`, one thread per rank: (exit code, output)."""
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    cmd = [MPIEXEC, "-n", str(n), sys.executable, *map(str, argv)]
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    return p.returncode, p.stdout + p.stderr


def train_rows(out: Path):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def assert_same_training(one: Path, two: Path, final: str):
    a, b = train_rows(one), train_rows(two)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5), x["step"]
        assert (x["ranks"], y["ranks"]) == (1, 2)
    assert json.loads((two / "run.json").read_text())["ranks"] == 2
    m1, m2 = (mc.load_model(d / "checkpoints" / final) for d in (one, two))
    for name in m1.parameter_names():
        np.testing.assert_allclose(m2.get_parameter(name), m1.get_parameter(name), rtol=0, atol=1e-5)


def test_two_ranks_train_what_one_process_trains(tmp_path):
    write_corpus(tmp_path, 12_000)
    cfgs = {}
    for n in (1, 2):
        cfgs[n] = write_config(
            tmp_path / f"r{n}.toml", f"r{n}", tmp_path / f"runs/r{n}", tmp_path / "models", STEPS
        )
    # grad_accum 2: accumulation composes with the split; global batch 4 x 2 windows. Dropout: each
    # rank draws the masks of its rows of one process's batch.
    sets = ["--set", "train.grad_accum=2", "--set", "model.spec.dropout=0.1"]
    code, log = ranks(1, "-m", "metalcandle", "train", cfgs[1], "--quiet", *sets)
    assert code == 0, log
    code, log = ranks(2, "-m", "metalcandle", "train", cfgs[2], "--quiet", *sets)
    assert code == 0, log
    assert_same_training(tmp_path / "runs/r1", tmp_path / "runs/r2", ck.step_dir_name(STEPS))


def test_two_ranks_lora_match_one_process(tmp_path, fixtures):
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat_rows()))
    models = tmp_path / "models"
    code = subprocess.call(
        [sys.executable, "-m", "metalcandle", "import-model", fixtures / "tiny-qwen2", "--models-dir", models]
    )
    assert code == 0
    cfgs = {
        n: write_config(tmp_path / f"l{n}.toml", f"l{n}", tmp_path / f"runs/l{n}", models, STEPS, LORA)
        for n in (1, 2)
    }
    for n in (1, 2):
        code, log = ranks(n, "-m", "metalcandle", "train", cfgs[n], "--quiet")
        assert code == 0, log
    a, b = train_rows(tmp_path / "runs/l1"), train_rows(tmp_path / "runs/l2")
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-5), x["step"]
    from safetensors.numpy import load_file

    w1, w2 = (
        load_file(tmp_path / f"runs/l{n}/checkpoints" / ck.step_dir_name(STEPS) / "adapter_model.safetensors")
        for n in (1, 2)
    )
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-5, err_msg=k)


def test_a_batch_that_does_not_split_is_refused_before_any_step(tmp_path):
    write_corpus(tmp_path, 6000)
    cfg = write_config(tmp_path / "c.toml", "c", tmp_path / "runs/c", tmp_path / "models", 4)
    code, log = ranks(2, "-m", "metalcandle", "train", cfg, "--quiet", "--set", "train.batch_size=3")
    assert code != 0
    assert "train.batch_size = 3 does not split over 2 ranks" in log
    assert not (tmp_path / "runs/c").exists()


def test_a_failing_rank_stops_the_job_and_is_named(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(
        "import numpy as np\n"
        "from metalcandle import distributed\n"
        "d = distributed.init()\n"
        "with d.abort_on_error():\n"
        "    if d.rank == 1:\n"
        "        raise ValueError('bad shard')\n"
        "    d.allreduce(np.zeros(4))  # rank 0 waits here for a rank that never comes\n"
    )
    code, log = ranks(2, script)
    assert code != 0
    assert "error: rank 1 of 2: ValueError: bad shard" in log


def rank_pid(root: int, rank: int) -> int | None:
    """The pid of `rank` among the descendants of process `root` (from PMI_RANK in its environment)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            stat = (p / "stat").read_text()
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env and "python" in (p / "comm").read_text():
            pid, ancestors = int(p.name), stat
            while True:
                ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == root:
                    return int(p.name)
                if ppid <= 1:
                    break
                pid = ppid
            del ancestors
    return None


def test_a_killed_rank_ends_the_job_and_one_rank_resumes(tmp_path):
    import signal
    import time

    write_corpus(tmp_path, 12_000)
    constant = ["--set", 'scheduler.name="constant"', "--set", "train.save_every=5"]
    cfg = write_config(tmp_path / "k.toml", "k", tmp_path / "runs/k", tmp_path / "models", 100_000)
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    job = subprocess.Popen(
        [MPIEXEC, "-n", "2", sys.executable, "-m", "metalcandle", "train", cfg, "--quiet", *constant],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while ck.latest_checkpoint(tmp_path / "runs/k/checkpoints") is None:
            assert job.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        pid = rank_pid(job.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        out, _ = job.communicate(timeout=60)  # the other rank stops within bounded time
    finally:
        job.kill()
    assert job.returncode != 0
    import re

    # MPI reports the bad termination by pid (of the killed rank, or of the one it then stopped,
    # whichever it sees first); the run's first line maps the killed pid to rank 1.
    assert "BAD TERMINATION" in out, out
    assert re.search(r"rank 1 = pid (\d+) on ", out).group(1) == str(pid), out

    last = ck.latest_checkpoint(tmp_path / "runs/k/checkpoints")
    mc.load_model(last)  # the last complete checkpoint is intact
    k = json.loads((last / ck.STATE_FILE).read_text())["step"]
    # Resume on one rank for 5 more steps; a fresh single-process run to the same step is the reference.
    code, log = ranks(
        1, "-m", "metalcandle", "train", cfg, "--quiet", *constant, "--set", f"train.max_steps={k + 5}"
    )
    assert code == 0, log
    ref = write_config(tmp_path / "ref.toml", "ref", tmp_path / "runs/ref", tmp_path / "models", k + 5)
    code, log = ranks(1, "-m", "metalcandle", "train", ref, "--quiet", *constant)
    assert code == 0, log
    got = {r["step"]: r for r in train_rows(tmp_path / "runs/k")}
    want = {r["step"]: r for r in train_rows(tmp_path / "runs/ref")}
    assert [s for s in got if s > k] == list(range(k + 1, k + 6))
    for s in range(1, k + 6):
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-5), s


def test_only_rank_0_writes_files(tmp_path):
    """Each rank runs in its own working folder, where the relative output and models folders
    resolve: rank 1's stays empty."""
    write_corpus(tmp_path, 6000)
    cfg = write_config(tmp_path / "w.toml", "w", "runs/w", "models", 6)
    folders = [tmp_path / "rank0", tmp_path / "rank1"]
    cmd = [MPIEXEC]
    for i, f in enumerate(folders):
        f.mkdir()
        cmd += [":"] * (i > 0) + [
            "-n",
            "1",
            "-wdir",
            f,
            sys.executable,
            "-m",
            "metalcandle",
            "train",
            cfg,
            "--quiet",
        ]
    p = subprocess.run(
        list(map(str, cmd)),
        env=dict(os.environ, RAYON_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    written = {q.relative_to(folders[0]).as_posix() for q in folders[0].rglob("*") if q.is_file()}
    assert {"runs/w/metrics.jsonl", "runs/w/run.json", "runs/w/loss.png", "models/registry.json"} <= written
    assert list(folders[1].rglob("*")) == []
    assert p.stdout.count("steps: 6") == 1  # the summary, from rank 0 alone
