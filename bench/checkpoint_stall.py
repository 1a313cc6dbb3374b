"""How long a checkpoint save stalls training: blocking vs background (``run.async_save``), as a table.

    python bench/checkpoint_stall.py --depth 2 --batch 2 --out bench/results/checkpoint_stall.md

One ZeRO-3 bf16 DeepSpeed engine (one rank, CPU or GPU) of the base-width pretraining model
(``base`` preset, ``--depth`` layers) trains on random inputs of the real shapes
(``bench/train_step.make_batch``); in this process, on the same engine:
  * normal step: the median of ``--steps`` steps without a save;
  * ``blocking`` (baseline): the step that saves with ``CheckpointManager(async_save=False)``:
    the step plus the whole save (every file written, fsynced, checksummed, marker written);
  * ``background``: the step that saves with ``async_save=True``: the step plus the snapshot of
    the state to CPU copies; the writer thread then writes while the next steps run, each
    calling ``poll()``, until the marker is written (the steps this took and their mean time
    are listed: on 2 shared CPU cores the writer competes with the step for the cores).
Ratios are saving-step time over the normal step, and against the blocking row.
"""
from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from train_step import make_batch  # bench/ is a folder of scripts: its own folder is on sys.path

from beit3.model import BEiT3ForPretraining, get_config
from beit3.runtime.checkpointing import CheckpointManager
from beit3.runtime.engine import (build_engine, engine_dtype, ensure_process_group_env,
                                   fill_batch_fields, load_ds_config)
from beit3.pretrain.objective import mdm_loss
from beit3.runtime.optim import OptimConfig, param_groups


def build(depth: int, batch: int, vocab_size: int):
    ensure_process_group_env()
    torch.manual_seed(0)
    model = BEiT3ForPretraining(get_config("base", depth=depth, vocab_size=vocab_size))
    optim = OptimConfig(warmup_steps=1, total_steps=1000)
    ds = fill_batch_fields(load_ds_config("zero3_bf16.json"), 3 * batch, 1)
    engine, _, _ = build_engine(model, ds, param_groups(model, optim.weight_decay, optim.lr), optim)
    inputs = make_batch(model.config, batch, 64, 32)
    dtype = engine_dtype(engine)

    def step() -> None:
        result = mdm_loss(engine, inputs, None, engine.device, dtype)
        engine.backward(result.loss)
        engine.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    return engine, step, n_params


def seconds(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def saving_step(engine, step: Callable[[], None], cm: CheckpointManager, tag_step: int) -> dict[str, float]:
    """Time the step that saves; for a background save, keep stepping until its marker is written."""
    row: dict[str, float] = {"saving": seconds(lambda: (step(), cm.save(engine, tag_step, {"step": tag_step})))}
    during = []
    while cm.pending_tag is not None:
        during.append(seconds(lambda: (step(), cm.poll())))
    row.update(cm.last_save, overlapped=len(during), during=statistics.mean(during) if during else float("nan"))
    return row


def fault_rows(cm: CheckpointManager, workdir: Path) -> list[str]:
    """Time to detect the checkpoint faults of the issue's fault table on the saved tag."""
    from beit3.model.safe_load import UnsafeFileError, load_untrusted

    tag = cm.latest_tag()
    intact = seconds(lambda: cm.verify(tag))
    victim = max((workdir / tag).glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size - 4096)
    problems: list[str] = []
    truncated = seconds(lambda: problems.extend(cm.verify(tag)))
    assert problems and victim.name in problems[0], problems
    (workdir / "step_99999999").mkdir()  # a save killed before its marker: files, no COMPLETE
    killed = seconds(lambda: cm.latest_tag())
    evil = workdir / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _CreatesFile(str(workdir / "pwned"))}, evil)
    refused: list[bool] = []

    def refuse() -> None:
        try:
            load_untrusted(evil)
        except UnsafeFileError:
            refused.append(True)

    pickle_s = seconds(refuse)
    assert refused and not (workdir / "pwned").exists()
    return ["| fault | detected by | time to detect s |", "|---|---|---|",
            f"| none (intact tag, full verify: sizes + xxh3_64 of every file) | `CheckpointManager.verify` "
            f"| {intact:.2f} |",
            f"| truncated shard ({victim.name}, -4 KiB) | size against the marker, before hashing | {truncated:.4f} |",
            f"| kill -9 during a background save | no `COMPLETE` marker: the tag is skipped | {killed:.4f} |",
            f"| malicious pickle (`open(...)` in `__reduce__`) | `torch.load(weights_only=True)` refuses | "
            f"{pickle_s:.4f} |"]


class _CreatesFile:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def run(depth: int, batch: int, steps: int, workdir: Path, vocab_size: int) -> str:
    engine, step, n_params = build(depth, batch, vocab_size)
    step()  # warm-up
    normal = statistics.median(seconds(step) for _ in range(steps))
    rows = {}
    modes = (("blocking (baseline)", False), ("background, first save (allocates the snapshot)", True),
             ("background, later saves (snapshot buffers reused)", True))
    for tag_step, (mode, async_save) in enumerate(modes, start=1):
        shutil.rmtree(workdir, ignore_errors=True)
        cm = CheckpointManager(str(workdir), keep_last=1, async_save=async_save)
        rows[mode] = saving_step(engine, step, cm, tag_step)
    faults = fault_rows(cm, workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    base = rows[modes[0][0]]["saving"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    first = rows[modes[0][0]]
    lines = [f"base width, depth {depth}, vocab {vocab_size}: {n_params / 1e6:.0f} M parameters, ZeRO-3 bf16, "
             f"1 rank, {device}; "
             f"batch {batch} images + {batch} texts + {batch} pairs; checkpoint "
             f"{first['bytes'] / 2 ** 30:.2f} GiB in {first['files']} files; "
             f"normal step {normal:.2f} s (median of {steps}); peak RSS {rss:.1f} GiB", "",
             "| save | saving step s | saving / normal step | vs blocking | training blocked s | of it: snapshot s "
             "| written in s | steps until COMPLETE | mean step while writing s |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in rows.items():
        lines.append(f"| {mode} | {r['saving']:.2f} | {r['saving'] / normal:.2f}x | {r['saving'] / base:.2f}x | "
                     f"{r['blocked_s']:.2f} | {r['snapshot_s']:.2f} | {r['total_s']:.2f} | {r['overlapped']} | "
                     f"{r['during']:.2f} |")
    return "\n".join(lines + [""] + faults) + "\n"


def main(argv: Optional[list[str]] = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=2, help="layers of the base-width model")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=64010, help="text vocabulary (the base preset's by default)")
    ap.add_argument("--steps", type=int, default=3, help="normal steps timed (median)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/beit3_ckpt_stall"))
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    table = run(args.depth, args.batch, args.steps, args.workdir, args.vocab_size)
    print(table)
    if args.out:
        args.out.write_text(f"`python bench/checkpoint_stall.py {' '.join(argv or sys.argv[1:])}`\n\n{table}")
    return table


if __name__ == "__main__":
    main()
