"""The one GPU check: everything a first session on a GPU machine should measure, as one command.

    python -m bench.gpu_check                 # on the GPU: writes bench/results/gpu_*.md (about 8 min on one H200)
    python -m bench.gpu_check --dry-run       # the same steps on CPU at tiny shapes (CI: tests/test_gpu_check.py)
    python -m bench.gpu_check --only train_base vqkd_codes

On a lent GPU machine without DeepSpeed: ``bash ../shared/device/offline-wheels.sh``, carry the ``.whl``
files, run the install line it prints, ``pip install -e .``, then this command.

Steps, each a subprocess bounded by its own timeout, its command, exit code, wall time and output
written to ``<out>/gpu_<step>.md`` and summed up in ``<out>/gpu_check.md``:

* ``ds_report``: DeepSpeed's op and environment report (which ops are prebuilt; none is JIT-built at start-up);
* ``gpu_tests``: the ``gpu`` test tier (dry run: it is collected);
* ``attention_base`` / ``attention_giant``: our attention kernel vs SDPA, bf16, forward + backward, at head
  dims 64 and 88 (dry run: the interpreted kernel's correctness mode on one case);
* ``train_base`` / ``train_large``: one rank, ZeRO-3 bf16, 30 steps eager; and ZeRO-2 with every block compiled
  (``model.compile`` is refused under ZeRO-3): samples/s, TFLOP/s, MFU, peak memory, and 3 more steps under
  ``torch.profiler`` (``bench/step_profile.py``): sync calls, the device's idle gaps, counted host waits per
  step (dry run: tiny, 2 steps);
* ``host_syncs``: the step's device-to-host waits on 2 CPU ranks (the same count on any machine: it is the CI's);
* ``loader``: loader samples/s per core, host-to-device bytes per image (``bench/data_pipeline.py``), and the
  whole loader with 4 / 8 / 12 workers into the step, views finished on the device, against a base rank's
  need at 30% MFU (dry run: 1 / 2 workers);
* ``vqkd_codes``: visual-token codes of the encoder in bf16 vs fp32, the fraction equal (goal >= 99.5%);
* ``nan_guard``: a 1-rank pretraining run on the device with a NaN injected at step 3: skipped, counted, finished;
* ``kill9_resume``: background saves, SIGKILL at step 5, a resume from step 4: steps 5-6 equal the uninterrupted run's.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
BIN = Path(sys.executable).parent
# a caller's process group (its port is taken) must not leak into the steps
PROCESS_GROUP_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass
class Step:
    name: str
    gpu: list[str]
    dry: list[str]
    timeout_s: int = 120
    env: dict[str, str] = field(default_factory=dict)


def steps() -> list[Step]:
    train = [PY, "bench/train_step.py", "--ds", "zero3_bf16.json", "--no-baseline"]
    compiled = ["&&", PY, "bench/train_step.py", "--ds", "zero2_bf16.json", "--no-baseline", "--compile", "on"]
    profile = ["--profile", "3"]  # 3 steps under torch.profiler (sync calls, idle gaps), 3 more counting host waits
    return [
        Step("ds_report", [str(BIN / "ds_report")], [str(BIN / "ds_report")], 60),
        Step("gpu_tests", [PY, "-m", "pytest", "-q", "-m", "gpu", "tests"],
             [PY, "-m", "pytest", "-q", "--collect-only", "-m", "gpu", "tests"], 150),
        Step("attention_base", [PY, "bench/attention.py", "--preset", "base", "--dtype", "bf16", "--batch", "64"],
             [PY, "bench/attention.py", "--device", "cpu", "--batch", "1", "--cases", "text"], 60,
             {"TRITON_INTERPRET": "1"}),
        Step("attention_giant", [PY, "bench/attention.py", "--preset", "giant", "--dtype", "bf16", "--batch", "64"],
             [PY, "bench/attention.py", "--device", "cpu", "--preset", "giant", "--batch", "1", "--cases", "text"],
             60, {"TRITON_INTERPRET": "1"}),
        Step("train_base", [*train, "--preset", "base", "--batch", "32", "--steps", "30", *profile,
                            *compiled, "--preset", "base", "--batch", "32", "--steps", "30", *profile],
             [*train, "--preset", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1", *profile], 150),
        Step("train_large", [*train, "--preset", "large", "--batch", "16", "--steps", "30", *profile,
                             *compiled, "--preset", "large", "--batch", "16", "--steps", "30", *profile],
             [*train, "--preset", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1", "--grad-ckpt", "on",
              *profile], 180),
        Step("host_syncs", [PY, "-m", "bench.host_syncs"], [PY, "-m", "bench.host_syncs", "--steps", "4"], 120),
        Step("loader", [PY, "bench/data_pipeline.py", "--repeat", "1", "--workers", "4", "8", "12"],
             [PY, "bench/data_pipeline.py", "--images", "32", "--samples", "16", "--repeat", "1",
              "--workers", "1", "2", "--workers-batch", "8", "--workers-batches", "4"], 180),
        Step("vqkd_codes", [PY, "-m", "bench.gpu_check", "--vqkd-codes", "base"],
             [PY, "-m", "bench.gpu_check", "--vqkd-codes", "tiny"], 60),
        Step("nan_guard", [PY, "-m", "bench.gpu_check", "--nan-guard", "cuda"],
             [PY, "-m", "bench.gpu_check", "--nan-guard", "cpu"], 150),
        Step("kill9_resume", [PY, "-m", "bench.gpu_check", "--kill9-resume", "cuda"],
             [PY, "-m", "bench.gpu_check", "--kill9-resume", "cpu"], 200),
    ]


def run_step(step: Step, dry: bool, out: Path) -> dict:
    argv = step.dry if dry else step.gpu
    env = {k: v for k, v in os.environ.items() if k not in PROCESS_GROUP_ENV}  # each step makes its own group
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **step.env})
    cmd = " ".join(argv)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, shell=True, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=step.timeout_s * (3 if dry else 1), start_new_session=True)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = None, f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {e.timeout:.0f} s"
    wall = time.time() - t0
    mode = "dry run (CPU, tiny shapes)" if dry else "GPU"
    (out / f"gpu_{step.name}.md").write_text(
        f"# gpu_check: {step.name} ({mode})\n\nCommand: `{cmd}`\n\nexit code {rc}, wall {wall:.1f} s\n\n"
        f"```\n{text[-12000:]}\n```\n")
    return {"step": step.name, "rc": rc, "wall_s": wall}


def vqkd_codes(preset: str) -> None:
    """Fraction of visual-token codes equal between the encoder in bf16 and in fp32 (random images)."""
    import torch
    import torch.nn.functional as F

    from beit3.model.vqkd import VQKD, get_vqkd_config
    from beit3.runtime.engine import select_device

    device = select_device()[1]  # BEIT3_DEVICE / auto (the CPU test tier's dry run: cpu)
    torch.manual_seed(0)
    tok = VQKD(get_vqkd_config(preset)).to(device).eval()
    with torch.no_grad():
        tok.quantize.embedding.weight.copy_(F.normalize(torch.randn_like(tok.quantize.codebook), dim=-1))
        tok.quantize.embedding.initted.fill_(1.0)
    size = tok.config.img_size
    images = torch.rand(16, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    fp32 = tok.codes(images, dtype=torch.float32)
    bf16 = tok.codes(images, dtype=torch.bfloat16)
    equal = (fp32 == bf16).double().mean().item()
    print(json.dumps({"preset": preset, "device": device.type, "codes": fp32.numel(), "bf16_equal_fraction": equal,
                      "goal": 0.995, "met": equal >= 0.995}))


def _tiny_inputs(work: Path) -> tuple[Any, Path]:
    """The demo data and a tiny VQ-KD tokenizer of the test recipe, built under ``work``."""
    from beit3.demo.data import build_demo_data
    from beit3.testing.jobs import TEST_DATA_ARGS
    from beit3.testing.tokenizers import make_tokenizer

    data = build_demo_data(work / "data", **TEST_DATA_ARGS)
    return data, make_tokenizer(work / "vqkd_tiny.pt", data.image_shards, data.spm_path)


def nan_guard(device: str) -> int:
    """1 rank on ``device``: the tiny test recipe for 5 steps with a NaN injected at step 3."""
    from beit3.runtime.faults import ENV
    from beit3.testing.jobs import launch, metrics, overrides

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, tok = _tiny_inputs(work)
        launch(1, overrides(data, tok, work / "run", **{"run.max_steps": 5, "run.save_every": 1000,
                                                       "data.num_workers": 0}),
               env={ENV: "nan:step=3:rank=0", "BEIT3_DEVICE": device}, timeout=600)
        rows = metrics(work / "run")
    skipped = [rows[s]["skipped_steps"] for s in sorted(rows)]
    print(json.dumps({"device": device, "skipped_steps_per_step": skipped, "losses": [rows[s]["loss"] for s in sorted(rows)]}))
    return 0 if skipped == [0, 0, 1, 1, 1] else 1


def kill9_resume(device: str) -> int:
    """1 rank on ``device``, background saves every 2 steps: SIGKILL at the start of step 5, then a
    relaunch (``run.resume=auto``) from step 4; steps 5-6 must equal an uninterrupted run's."""
    from beit3.runtime.faults import ENV
    from beit3.runtime.ports import reserve_port
    from beit3.testing.jobs import launch, launch_cmd, metrics, overrides, run_env, run_job

    extra = {"run.max_steps": 6, "run.save_every": 2, "run.async_save": True, "optim.warmup_steps": 2}
    env = {"BEIT3_DEVICE": device}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, tok = _tiny_inputs(work)
        launch(1, overrides(data, tok, work / "ref", **extra), env=env, timeout=600)
        args = overrides(data, tok, work / "run", **extra)
        with reserve_port() as port:
            rc, _ = run_job(launch_cmd(1, port, args), {**run_env(), **env, ENV: "exit:step=5:rank=0"}, 600)
        killed_at = max(metrics(work / "run"))
        launch(1, args, env=env, timeout=600)
        ref, run = metrics(work / "ref"), metrics(work / "run")
    diffs = {s: abs(run[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in (5, 6)}
    ok = rc != 0 and killed_at == 4 and all(d <= 1e-4 for d in diffs.values())
    print(json.dumps({"device": device, "killed_rc": rc, "last_step_before_kill": killed_at,
                      "rel_loss_diff_steps_5_6": diffs, "goal_rel": 1e-4, "met": ok}))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every step on CPU at tiny shapes")
    ap.add_argument("--out", type=Path, default=None, help="default: bench/results (GPU), a temporary folder (dry run)")
    ap.add_argument("--only", nargs="+", default=None, help="run these steps only")
    ap.add_argument("--list", action="store_true", help="print the step names and exit")
    ap.add_argument("--vqkd-codes", metavar="PRESET", help=argparse.SUPPRESS)
    ap.add_argument("--nan-guard", metavar="DEVICE", help=argparse.SUPPRESS)
    ap.add_argument("--kill9-resume", metavar="DEVICE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(s.name for s in steps()))
        return 0
    if args.vqkd_codes:
        vqkd_codes(args.vqkd_codes)
        return 0
    if args.nan_guard:
        return nan_guard(args.nan_guard)
    if args.kill9_resume:
        return kill9_resume(args.kill9_resume)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run else REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in steps() if not args.only or s.name in args.only]
    results = []
    for step in todo:
        r = run_step(step, args.dry_run, out)
        results.append(r)
        print(f"{r['step']:16s} exit {r['rc']}  {r['wall_s']:.1f} s", flush=True)
    lines = ["| step | exit code | wall (s) |", "|---|---:|---:|"]
    lines += [f"| [{r['step']}](gpu_{r['step']}.md) | {r['rc']} | {r['wall_s']:.1f} |" for r in results]
    total = sum(r["wall_s"] for r in results)
    (out / "gpu_check.md").write_text(f"# gpu_check ({'dry run' if args.dry_run else 'GPU'})\n\n"
                                      + "\n".join(lines) + f"\n\ntotal {total:.0f} s\n")
    print(f"results: {out}/gpu_check.md (total {total:.0f} s)")
    return 0 if all(r["rc"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
