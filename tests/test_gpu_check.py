"""``bench/gpu_check.py --dry-run``: the GPU check's steps run end to end on CPU at tiny shapes, so the
command is not broken when a GPU comes. ``host_syncs``, ``nan_guard`` and ``kill9_resume`` are left to the
tests that run the same launches (``test_host_syncs.py``, ``test_guard.py``, ``test_pretrain.py``'s kill -9
and ``test_checkpointing.py``'s background-save kill)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
STEPS = ["ds_report", "gpu_tests", "attention_base", "attention_giant", "train_base", "train_large", "loader",
         "vqkd_codes"]


@pytest.mark.distributed
def test_gpu_check_dry_run_passes_every_step_and_writes_its_results(tmp_path):
    names = STEPS
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path), "--only",
                           *names], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    listed = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--list"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    assert set(listed) == set(STEPS) | {"host_syncs", "nan_guard", "kill9_resume"}  # every step is either here or elsewhere
    summary = (tmp_path / "gpu_check.md").read_text()
    for name in names:
        text = (tmp_path / f"gpu_{name}.md").read_text()
        assert "exit code 0" in text and f"[{name}]" in summary, text[-2000:]
    assert "bf16_equal_fraction" in (tmp_path / "gpu_vqkd_codes.md").read_text()
    assert "deepspeed zero3_bf16 packed" in (tmp_path / "gpu_train_base.md").read_text()
