"""The loss-curve guard: a short deterministic 2-rank ZeRO-3 run compared step by step with a
committed reference (``tests/data/loss_curve.json``).

Regenerate the reference (after an intended numerical change, e.g. a new forward path):

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.loss_curve --write

Measure the spread that sets the tolerance (same settings twice, 2 intra-op threads, AVX2-only
kernels as another machine would pick; prints a table):

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.loss_curve --spread

The run: tiny preset (``pretrain/configs/tiny_demo.yaml``), the test session's demo data
(``TEST_DATA_ARGS``) and k-means-initialized frozen tokenizer, 16+16+16 samples per step,
``STEPS`` steps saving every 4, lr 1e-3 (cosine over 400), warmup 2, pair masking 0.5, seed 0,
``zero3_bf16.json`` (``beit3.testing.jobs.reference_overrides``: the test session launches it once,
as ``reference_run``, and the other pretraining tests compare with it too). What is compared: per
step, rank 0's total, MIM and MLM losses.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from beit3.testing.jobs import REFERENCE_STEPS, REPO, TEST_DATA_ARGS, launch, metrics, reference_overrides
from beit3.testing.tokenizers import make_tokenizer

REFERENCE = REPO / "tests" / "data" / "loss_curve.json"
BROKEN = REPO / "tests" / "broken_objective_train.py"
STEPS = REFERENCE_STEPS
KEYS = ("loss", "mim_loss", "mlm_loss")
REGENERATE = "OMP_NUM_THREADS=1 .venv/bin/python -m tests.loss_curve --write"
# The spread runs: (name, extra environment). ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA make this
# machine take the AVX2 kernels an older CPU would (other vectorized reduction orders).
VARIANTS = (("repeat", {}), ("2 threads", {"OMP_NUM_THREADS": "2"}),
            ("AVX2 kernels", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}))


def guard_overrides(data, tokenizer: Path, out: Path) -> list[str]:
    # the optimizer and masking settings are pinned in overrides(), so that tuning the demo's YAML leaves the reference valid
    return reference_overrides(data, tokenizer, out)


def run_curve(data, tokenizer: Path, out: Path, broken: bool = False,
              env: Optional[dict[str, str]] = None) -> dict[str, list[float]]:
    """Per-step losses of the guard run (``broken``: MLM labels shifted by one position)."""
    kwargs = {"script": BROKEN} if broken else {}
    launch(2, guard_overrides(data, tokenizer, out), env=env, **kwargs)
    return read_curve(out)


def read_curve(out: Path) -> dict[str, list[float]]:
    """Per-step losses of a finished guard run (the session's ``reference_run`` is one)."""
    rows = metrics(out)
    assert sorted(rows) == list(range(1, STEPS + 1)), sorted(rows)
    return {k: [rows[s][k] for s in range(1, STEPS + 1)] for k in KEYS}


def load_reference(path: Path = REFERENCE) -> dict:
    return json.loads(path.read_text())


def outside_band(curve: dict[str, list[float]], ref: dict) -> list[str]:
    """Every (key, step) whose value leaves ``|x - ref| <= atol + rtol * |ref|``; empty: inside."""
    atol, rtol = ref["tolerance"]["atol"], ref["tolerance"]["rtol"]
    bad = []
    for k in KEYS:
        for step, (x, r) in enumerate(zip(curve[k], ref["curve"][k]), start=1):
            if abs(x - r) > atol + rtol * abs(r):
                bad.append(f"{k} step {step}: {x:.5f} vs reference {r:.5f}")
    return bad


def max_deviation(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    return max(abs(x - y) for k in KEYS for x, y in zip(a[k], b[k]))


def build_inputs(root: Path):
    from beit3.demo.data import build_demo_data

    data = build_demo_data(root / "data", **TEST_DATA_ARGS)
    return data, make_tokenizer(root / "vqkd_tiny.pt", data.image_shards, data.spm_path)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.loss_curve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"rewrite {REFERENCE.relative_to(REPO)} (keeps its tolerance)")
    ap.add_argument("--spread", action="store_true", help="measure run-to-run and kernel/thread spread")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, tok = build_inputs(root)
        curve = run_curve(data, tok, root / "run")
        if args.spread:
            print("| variant | max abs deviation from the first run (any key, any step) |\n|---|---|")
            for i, (name, env) in enumerate(VARIANTS):
                other = run_curve(data, tok, root / f"variant{i}", env=env)
                print(f"| {name} | {max_deviation(curve, other):.2e} |")
            broken = run_curve(data, tok, root / "broken", broken=True)
            print(f"| broken objective (MLM labels shifted by one) | {max_deviation(curve, broken):.2e} |")
        if args.write:
            old = load_reference() if REFERENCE.is_file() else {}
            ref = {"about": old.get("about", ""), "regenerate": REGENERATE,
                   "tolerance": old.get("tolerance", {"atol": 0.02, "rtol": 0.01}),
                   "measured_spread": old.get("measured_spread", {}),
                   "written_with": {"torch": torch.__version__, "python": platform.python_version(),
                                    "machine": platform.machine()},
                   "steps": STEPS, "curve": curve}
            REFERENCE.parent.mkdir(parents=True, exist_ok=True)
            REFERENCE.write_text(json.dumps(ref, indent=1) + "\n")
            print(f"wrote {REFERENCE}")
        if not args.write and not args.spread:
            print(json.dumps(curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
