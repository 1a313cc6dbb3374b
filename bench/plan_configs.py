"""The run planner over the shipped pretraining configs (bench/results/plan.md).

    .venv/bin/python -m bench.plan_configs [--out bench/results/plan.md]

One summary row per config x GPU count (H100, zero3_bf16.json), the full table of one plan, and
the sanity row: the paper's giant recipe on 256 A100-40GB at the MFU that makes it take two weeks
(unilm #930: "about two weeks on 256 A100-40GB").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from beit3.pretrain import plan

REPO = plan.REPO
CONFIGS = ("base", "giant")
GPUS = (8, 64, 256)


def summary(p: dict) -> str:
    m, t, d, f = p["memory"], p["time"], p["data"], p["faults"]
    fit = f"accum {m['fit_accum']}" if m["fit_accum"] else "none tried"
    return (f"| {Path(p['config']).stem} | {p['gpus']} x {p['gpu']} | {m['micro']} | {m['peak'] / 1e9:.1f} GB | "
            f"{'yes' if m['fits'] else 'NO'} ({fit}) | {t['step_s']:.3f} s | {t['days']:.1f} | {t['gpu_days']:.0f} | "
            f"{d['cores_per_gpu']:.1f} | {f['sharded_bytes'] / 1e9:.1f} GB | {f['interval_s'] / 60:.1f} min |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "plan.md"))
    a = ap.parse_args(argv)
    lines = ["# Run planner over the shipped configs", "",
             f"`.venv/bin/python -m bench.plan_configs` (python {sys.version.split()[0]}; the planner runs on the CPU, "
             "activations measured on the meta device). MFU 0.35 is an assumption (no GPU measurement committed); "
             "save time assumes 2 GB/s per node; MTBF from the Llama 3 per-GPU rate.", "",
             "| config | GPUs | micro-batch per rank | peak per GPU | fits | step | days | GPU-days | loader cores/GPU "
             "| checkpoint | Young/Daly |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    full = None
    for name in CONFIGS:
        for gpus in GPUS:
            try:
                p = plan.plan(f"pretrain/configs/{name}.yaml", "zero3_bf16.json", gpus, "h100")
            except Exception as e:  # noqa: BLE001 - e.g. a global batch that does not divide: one row saying so
                lines.append(f"| {name} | {gpus} x h100 | - | - | {type(e).__name__}: {e} | | | | | | |")
                continue
            lines.append(summary(p))
            if name == "base" and gpus == 64:
                full = p
            print(lines[-1], flush=True)
    giant = "pretrain/configs/giant.yaml"
    ref = plan.plan(giant, "zero3_bf16.json", 256, "a100-40gb", mfu=1.0)
    mfu = ref["time"]["days"] / 14.0
    sane = plan.plan(giant, "zero3_bf16.json", 256, "a100-40gb", mfu=mfu)
    t = sane["time"]
    lines += ["", "## Sanity row: the paper's giant run", "",
              "| config | GPUs | step FLOPs | MFU | days | GPU-days |", "|---|---|---|---|---|---|",
              f"| giant | 256 x a100-40gb | {t['step_flops']:.3e} | {mfu:.3f} | {t['days']:.1f} | {t['gpu_days']:.0f} |", "",
              f"Arithmetic: {t['total_steps']:,} steps x {t['step_flops']:.3e} FLOPs / (256 x 312e12 FLOP/s x "
              f"14 d x 86400 s) = MFU {mfu:.3f}: two weeks on 256 A100-40GB (unilm #930) implies "
              f"{100 * mfu:.1f}% MFU on the real-token FLOPs, well below the 0.35 the planner assumes (which would "
              f"give {14.0 * mfu / plan.DEFAULT_MFU:.1f} days): the public figure fits a run that was not compute-bound "
              f"or whose two weeks include more than training; the peak per GPU {sane['memory']['peak'] / 1e9:.1f} GB fits 40 GB: {sane['memory']['fits']}.",
              "", "## Full table: base on 64 x H100", "", plan.format_table(full) if full else "(not planned)", ""]
    Path(a.out).write_text("\n".join(lines))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
