"""Host waits per optimizer step of a real 2-rank ZeRO-3 pretraining run (tiny preset, CPU, gloo).

    python -m bench.host_syncs [--steps 7] [--accum 1] [--adam fused|unfused] [--json out.json]

Launches ``pretrain/train.py``'s ``main`` on 2 ranks (``testing/step_syncs.py``), every step
under ``runtime.host_syncs.HostSyncCounter`` (the ops that block the host when their tensors are
on a GPU: scalar reads, ``nonzero``, boolean indexing, device-to-host copies, ``tolist``), and
prints per source of the step the events per optimizer step: the steady steps (the first two,
start-up and ZeRO-3's trace recording, and the last one, which logs and saves, are shown apart).
``run.log_every`` is larger than the run, so steady steps do not log. Counts are deterministic.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

from beit3.testing.step_syncs import WARMUP, measure


def table(per_rank: list[dict[str, dict[str, int]]], steps: int) -> tuple[str, dict[str, float]]:
    steady = [f"step{s}" for s in range(WARMUP + 1, steps)]
    rows: Counter = Counter()
    for counts in per_rank[:1]:  # rank 0 (every rank runs the same step)
        for seg in steady:
            rows.update(counts.get(seg, {}))
    per_step = {k: v / len(steady) for k, v in rows.items()}
    first = sum(sum(per_rank[0].get(f"step{s}", {}).values()) for s in range(1, WARMUP + 1))
    last = sum(per_rank[0].get(f"step{steps}", {}).values())
    lines = ["| source of the step | kind | events per optimizer step |", "|---|---|---:|"]
    for key, n in sorted(per_step.items(), key=lambda kv: -kv[1]):
        source, kind = key.rsplit(" ", 1)
        lines.append(f"| `{source}` | {kind} | {n:g} |")
    total = sum(per_step.values())
    lines.append(f"| **total (steady step, rank 0)** | | **{total:g}** |")
    lines.append(f"\nfirst {WARMUP} steps (start-up, ZeRO-3's trace recording): {first}; last step (logs and saves): {last}; "
                 f"steady steps counted: {len(steady)}")
    return "\n".join(lines), per_step


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--accum", type=int, default=1, help="micro-steps per optimizer step")
    ap.add_argument("--adam", choices=("fused", "unfused"), default="fused",
                    help="fused: torch's fused AdamW, what a CUDA run uses; unfused: the CPU tier's AdamW, "
                         "whose step counter is a host tensor (its .item() is not a device wait on a GPU)")
    ap.add_argument("--json", help="write the per-source counts of a steady step here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        per_rank = measure(args.steps, args.accum, Path(tmp), fused=args.adam == "fused")
    text, per_step = table(per_rank, args.steps)
    print(f"host waits per optimizer step: tiny preset, 2 ranks, ZeRO-3 bf16, grad_accum {args.accum}, "
          f"{args.adam} AdamW\n")
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(per_step, indent=1, sort_keys=True))
    return per_step


if __name__ == "__main__":
    main()
