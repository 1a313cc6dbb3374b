"""What a test's 2-rank launch costs, per launcher: the tiny pretraining recipe, ZeRO-3, 2 steps.

    python -m bench.launch_cost [--repeats 3] [--steps 2]

Runs the same job ``--repeats`` times in a row under each launcher the tests use: the ``deepspeed``
launcher (runner + launch, fresh ranks), ``torchrun`` (``BEIT3_FORK_SERVER=0``) and the test fork
server (``beit3.testing.forkserver``; its first launch includes starting the server). Prints the wall
seconds of each launch and the ratio of the median against ``torchrun``'s. The job's first step
losses must agree across launchers (same seed, same data): a launcher may only change the cost.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from beit3.runtime.ports import reserve_port
from beit3.testing.jobs import TEST_DATA_ARGS, launch_cmd, metrics, overrides, run_env, run_job

LAUNCHERS = (("deepspeed", "deepspeed", "0"), ("torchrun", "torchrun", "0"), ("fork server", "torchrun", "1"))


def one(data, tokenizer, out: Path, steps: int, launcher: str, fork: str) -> tuple[float, float]:
    args = overrides(data, tokenizer, out, **{"run.max_steps": steps, "run.seed": 0})
    began = time.monotonic()
    with reserve_port() as port:
        rc, text = run_job(launch_cmd(2, port, args, launcher=launcher), {**run_env(), "BEIT3_FORK_SERVER": fork}, 600)
    seconds = time.monotonic() - began
    if rc != 0:
        raise SystemExit(f"{launcher} launch failed ({rc}):\n{text[-4000:]}")
    return seconds, metrics(out)[1]["loss"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("BEIT3_DEVICE", "cpu")
    from beit3.demo.data import build_demo_data
    from beit3.testing.tokenizers import make_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = build_demo_data(root / "data", **TEST_DATA_ARGS)
        tokenizer = make_tokenizer(root / "vqkd_tiny.pt", data.image_shards, data.spm_path)
        rows, losses = {}, set()
        for name, launcher, fork in LAUNCHERS:
            rows[name] = []
            for i in range(args.repeats):
                seconds, loss = one(data, tokenizer, root / f"{name}{i}".replace(" ", "_"), args.steps, launcher, fork)
                rows[name].append(seconds)
                losses.add(loss)
    base = statistics.median(rows["torchrun"])
    print(f"2 ranks, tiny preset, ZeRO-3 bf16, {args.steps} steps; wall seconds per launch, {args.repeats} in a row\n")
    print("| launcher | " + " | ".join(f"launch {i + 1}" for i in range(args.repeats)) + " | median | vs torchrun |")
    print("|---|" + "---:|" * (args.repeats + 2))
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"| {name} | " + " | ".join(f"{t:.2f}" for t in times) + f" | {med:.2f} | {base / med:.2f}x |")
    print(f"\nstep-1 loss of every launch: {sorted(losses)} ({'equal' if len(losses) == 1 else 'DIFFERENT'})")
    return 0 if len(losses) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
