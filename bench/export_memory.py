"""Peak memory of exporting consolidated weights from a ZeRO-3 checkpoint, as a table.

    python bench/export_memory.py --preset base [--workdir /tmp/beit3_export_bench]

Makes (once, cached in ``--workdir``) a real sharded ZeRO-3 bf16 checkpoint of the pretraining
model with one DeepSpeed rank, then runs each variant in its own fresh process and reads that
process's peak resident memory (``wait4`` rusage):
  * ``import only``: the interpreter with torch, DeepSpeed and the project imported (the floor);
  * ``deepspeed zero_to_fp32`` (baseline): DeepSpeed's standard consolidation,
    ``get_fp32_state_dict_from_zero_checkpoint`` (eager) followed by ``safetensors.save_file``;
  * ``beit3 export``: ``python -m beit3.pretrain.export`` (memory-mapped shards, one tensor
    gathered and written at a time), fp32 and bf16, and with ``--official``.
The "weights" column is one fp32 copy of the model's parameters.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent


def make_checkpoint(preset: str, root: Path) -> None:
    """A one-rank ZeRO-3 bf16 engine of ``BEiT3ForPretraining(preset)`` saved by our CheckpointManager."""
    import torch

    from beit3.model import BEiT3ForPretraining, get_config
    from beit3.runtime.checkpointing import CheckpointManager
    from beit3.runtime.engine import build_engine, fill_batch_fields, load_ds_config
    from beit3.runtime.optim import OptimConfig, param_groups
    from beit3.runtime.engine import ensure_process_group_env

    ensure_process_group_env()
    torch.manual_seed(0)
    model = BEiT3ForPretraining(get_config(preset))
    optim = OptimConfig()
    ds = fill_batch_fields(load_ds_config("zero3_bf16.json"), 1, 1)
    engine, _, _ = build_engine(model, ds, param_groups(model, optim.weight_decay, optim.lr), optim)
    client = {"step": 0, "config": {"model": {"preset": preset, "overrides": {}}}}
    CheckpointManager(str(root)).save(engine, 0, client)


def peak_rss_gb(cmd: list[str]) -> float:
    """Run ``cmd`` to completion; its peak resident set size in GiB."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return usage.ru_maxrss / 2 ** 20


_BASELINE = """
import sys
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import save_file
sd = get_fp32_state_dict_from_zero_checkpoint(sys.argv[1], tag=sys.argv[2])
save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[3])
"""


def main(argv: Optional[list[str]] = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--workdir", default="/tmp/beit3_export_bench")
    ap.add_argument("--out", default=None, help="also write the table (markdown) here")
    ap.add_argument("--make-checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.workdir) / args.preset
    ckpt = work / "checkpoints"
    if args.make_checkpoint:
        make_checkpoint(args.preset, ckpt)
        return []
    from beit3.runtime.checkpointing import CheckpointManager

    if CheckpointManager(str(ckpt)).latest_tag() is None:
        print(f"making a {args.preset} ZeRO-3 checkpoint under {ckpt} ...", flush=True)
        peak_rss_gb([sys.executable, __file__, "--preset", args.preset, "--workdir", args.workdir, "--make-checkpoint"])
    tag = CheckpointManager(str(ckpt)).latest_tag()
    import torch

    from beit3.model import BEiT3ForPretraining, get_config

    with torch.device("meta"):
        weights_gb = sum(p.numel() for p in BEiT3ForPretraining(get_config(args.preset)).parameters()) * 4 / 2 ** 30
    py = sys.executable
    export = [py, "-m", "beit3.pretrain.export", str(ckpt), "--tag", tag]
    variants = [
        ("import only", [py, "-c", "import torch, deepspeed, beit3.pretrain.export"]),
        ("deepspeed zero_to_fp32 + save_file (baseline)", [py, "-c", _BASELINE, str(ckpt), tag, str(work / "ds.safetensors")]),
        ("beit3 export fp32", export + ["--out", str(work / "fp32")]),
        ("beit3 export bf16", export + ["--out", str(work / "bf16"), "--dtype", "bf16"]),
        ("beit3 export fp32 --official", export + ["--out", str(work / "official"), "--official"]),
    ]
    rows = [{"variant": name, "rss_gb": peak_rss_gb(cmd)} for name, cmd in variants]
    floor, base = rows[0]["rss_gb"], rows[1]["rss_gb"]
    lines = [f"preset {args.preset}: {weights_gb:.2f} GiB of fp32 weights; checkpoint {ckpt}/{tag} (ZeRO-3 bf16, 1 rank)",
             "", "| variant | peak RSS GiB | above import floor GiB | (peak - floor) / weights | vs baseline |",
             "|---|---|---|---|---|"]
    for r in rows:
        above = r["rss_gb"] - floor
        lines.append(f"| {r['variant']} | {r['rss_gb']:.2f} | {above:.2f} | {above / weights_gb:.2f} | "
                     f"{r['rss_gb'] / base:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
