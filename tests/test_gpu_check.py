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
    for name in ("train_base", "train_large"):  # the step table, then the 3 profiled steps of the same row
        text = (tmp_path / f"gpu_{name}.md").read_text()
        assert "| deepspeed zero3_bf16 packed" in text and "| deepspeed zero3_bf16 packed" in text.split("busy")[1]
    loader = (tmp_path / "gpu_loader.md").read_text()
    assert "| 1 |" in loader.split("delivered / need")[1] and "| 2 |" in loader.split("delivered / need")[1]


def test_step_profile_reads_the_device_timeline_and_the_blocking_calls_of_a_trace():
    """The GPU half of ``bench/step_profile.summarize`` on a trace in the profiler's Chrome format (a CPU
    run has no device events: its own trace takes the CPU-ops branch, run by the dry run above)."""
    from bench.step_profile import summarize

    def x(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    events = [x("kernel", "gemm", 0, 100), x("kernel", "gemm", 50, 100),  # overlapping: busy 0-150
              x("gpu_memcpy", "Memcpy DtoH", 400, 50), x("kernel", "add", 460, 40),  # gaps 250 and 10 us
              x("cpu_op", "aten::mm", 0, 1000),  # a device timeline exists: CPU ops are not the timeline
              x("cuda_runtime", "cudaStreamSynchronize", 300, 100), x("cuda_runtime", "cudaDeviceSynchronize", 900, 1),
              *[x("cuda_runtime", "cudaLaunchKernel", t, 5) for t in range(5)], {"ph": "i", "name": "marker"}]
    s = summarize(events, steps=2, gap_us=100)
    assert s["timeline"] == "device"
    assert s["window_ms_per_step"] == 0.25 and s["busy_fraction"] == 240 / 500
    assert s["gaps_per_step"] == 0.5 and s["gap_ms_per_step"] == 0.125 and s["largest_gaps_ms"] == [0.25]
    assert s["sync_calls_per_step"] == 1.0
    cpu = summarize([x("cpu_op", "aten::mm", 0, 10), x("cpu_op", "aten::add", 5, 10), x("cpu_op", "aten::mm", 300, 100)],
                    steps=1)
    assert cpu["timeline"] == "cpu ops" and cpu["gaps_per_step"] == 1 and cpu["busy_fraction"] == 115 / 400
