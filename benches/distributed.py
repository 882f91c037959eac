"""Data-parallel step throughput: 1 rank x 2 threads against 2 ranks x 1 thread, and the share of
the step spent in the gradient all-reduce.

    python benches/distributed.py [--d-model 512 --layers 8 --seq 256 --batch 4 --steps 3]

Runs itself under mpiexec; prints tokens/s per layout, all-reduce share and gradient bytes/step."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def worker(a) -> None:
    import metalcandle as mc
    from metalcandle import distributed

    d = distributed.init()
    cfg = {"model_type": "llama", "vocab_size": a.vocab, "hidden_size": a.d_model,
           "intermediate_size": 4 * a.d_model, "num_hidden_layers": a.layers,
           "num_attention_heads": a.d_model // 64, "num_key_value_heads": a.d_model // 64,
           "max_position_embeddings": a.seq, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}  # fmt: skip
    model = mc.Model.from_config(cfg, seed=0)
    if a.lora:
        model.add_lora(r=16, alpha=32, target_modules=["all-linear"], seed=0)
    trainer = mc.Trainer(model, mc.AdamW(lr=1e-4), comm=d)
    reduce_time = [0.0]
    inner = d.allreduce

    def timed(array):
        t0 = time.perf_counter()
        inner(array)
        reduce_time[0] += time.perf_counter() - t0

    d.allreduce = timed
    ids = np.random.default_rng(0).integers(0, a.vocab, (a.batch, a.seq))
    trainer.step(ids)  # warm-up
    reduce_time[0] = 0.0
    t0 = time.perf_counter()
    for _ in range(a.steps):
        trainer.step(ids)
    dt = time.perf_counter() - t0
    grad_bytes = 4 * sum(int(x.size) for x in model.trainable_parameters().values())
    if d.is_main:
        row = {"ranks": d.size, "tokens_per_s": a.steps * ids.size / dt}
        row.update(allreduce_share=reduce_time[0] / dt, grad_bytes_per_step=grad_bytes)
        print(json.dumps(row))


def main() -> None:
    p = argparse.ArgumentParser()
    for k, v in (("--d-model", 512), ("--layers", 8), ("--seq", 256), ("--batch", 4), ("--steps", 3),
                 ("--vocab", 32000)):  # fmt: skip
        p.add_argument(k, type=int, default=v)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--worker", action="store_true")
    a = p.parse_args()
    if a.worker:
        return worker(a)
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for ranks, threads in ((1, 2), (2, 1)):
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
        cmd = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker", *sys.argv[1:]]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        print(f"{ranks} rank(s) x {threads} thread(s): {out.strip()}")


if __name__ == "__main__":
    main()
