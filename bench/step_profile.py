"""A few training steps under ``torch.profiler``: the host's waits and the device's idle gaps per step.

Used by ``bench/train_step.py --profile N`` (and so by ``bench/gpu_check.py``'s training steps). The
profiler's Chrome trace gives, over the profiled steps:

* **sync calls**: CUDA runtime / driver calls that block the host until the device is done
  (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, a blocking
  ``cudaMemcpy``); none on CPU;
* **idle gaps**: the device timeline (kernels, memcpy, memset) from its first to its last event, merged;
  every gap longer than ``gap_us`` is time the device waited for the host (Python, a launch, a sync).
  Without a device timeline (CPU, the dry run) the same is computed over the top-level CPU ops, so the
  code path is the GPU's.

and, over ``N`` more steps, the host waits ``runtime.host_syncs.HostSyncCounter`` counts (the ops that
block the host when their tensors are on the device; the same count on CPU and GPU). Counts are per step
(the total over ``N`` steps divided by ``N``).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch

from beit3.runtime.host_syncs import HostSyncCounter

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize"}


def merged(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``(start, end)`` intervals, sorted and non-overlapping."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(s, e) for s, e in out]


def summarize(events: list[dict], steps: int, gap_us: float = 100.0) -> dict:
    """Per-step sync counts and the idle gaps of the device timeline (or of the CPU ops without one)."""
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in spans if e.get("cat") in DEVICE_CATS]
    timeline = "device" if device else "cpu ops"
    busy = merged((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in (device or
                  [e for e in spans if e.get("cat") == "cpu_op"]))
    gaps = [b[0] - a[1] for a, b in zip(busy, busy[1:])]
    long = sorted((g for g in gaps if g > gap_us), reverse=True)
    window = busy[-1][1] - busy[0][0] if busy else 0.0
    busy_us = sum(e - s for s, e in busy)
    calls = sum(1 for e in spans if e.get("cat") in ("cuda_runtime", "cuda_driver") and e.get("name") in SYNC_CALLS)
    return {"timeline": timeline, "steps": steps, "window_ms_per_step": window / 1e3 / steps,
            "busy_fraction": busy_us / window if window else float("nan"),
            "gaps_per_step": len(long) / steps, "gap_ms_per_step": sum(long) / 1e3 / steps,
            "largest_gaps_ms": [g / 1e3 for g in long[:3]], "gap_us": gap_us,
            "sync_calls_per_step": calls / steps}


def profile_steps(step: Callable[[], None], steps: int) -> dict:
    """Runs ``step`` ``steps`` times under the profiler (CPU, and CUDA when there is one) and summarizes,
    then ``steps`` more times under ``HostSyncCounter``."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    summary = summarize(events, steps)
    with HostSyncCounter() as counter:
        for _ in range(steps):
            step()
    summary["host_waits_per_step"] = counter.total(None) / steps
    return summary


def table(rows: list[tuple[str, dict]]) -> str:
    """One markdown row per profiled variant."""
    gap_us = rows[0][1]["gap_us"] if rows else 100.0
    lines = [f"| variant (profiled steps) | timeline | ms per step | busy | gaps > {gap_us:.0f} us per step "
             "| idle in them (ms/step) | largest gaps (ms) | sync calls per step | host waits per step (counted) |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for name, s in rows:
        largest = ", ".join(f"{g:.2f}" for g in s["largest_gaps_ms"]) or "-"
        calls = f"{s['sync_calls_per_step']:.1f}" if s["timeline"] == "device" else "- (no device)"
        lines.append(f"| {name} ({s['steps']}) | {s['timeline']} | {s['window_ms_per_step']:.1f} "
                     f"| {100 * s['busy_fraction']:.1f}% | {s['gaps_per_step']:.1f} | {s['gap_ms_per_step']:.2f} "
                     f"| {largest} | {calls} | {s['host_waits_per_step']:.1f} |")
    return "\n".join(lines)
