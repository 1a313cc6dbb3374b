"""One logger, one line per step: throughput, TFLOP/s, MFU and memory.

``StepMeter`` measures wall time between logging points and turns model FLOPs into TFLOP/s and
MFU against the device's peak (dense bf16); ``log_step`` prints one line on rank 0.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

LOGGER_NAME = "beit3"

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "GH200": 989.4, "A100": 312.0,
                    "A800": 312.0, "L40S": 362.1, "A10G": 70.0, "4090": 165.2, "V100": 125.0}


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


class _RankFilter(logging.Filter):
    """Tags a record with this process's rank and passes INFO only on rank 0, both decided when the
    record is emitted: the logger is made at import, which may come before the rank is known."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = rank()
        return record.rank == 0 or record.levelno >= logging.WARNING


def get_logger(name: str = LOGGER_NAME) -> logging.Logger:
    """The project logger (stdout, rank-tagged, INFO on rank 0 and WARNING elsewhere)."""
    root = logging.getLogger(LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s [rank%(rank)s] %(name)s: %(message)s", "%H:%M:%S"))
        handler.addFilter(_RankFilter())
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(name) if name.startswith(LOGGER_NAME) else root.getChild(name)


def device_peak_tflops() -> Optional[float]:
    """The current GPU's dense bf16 peak, or None (CPU, unknown GPU): MFU is then not reported."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def read_scalars(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """0-d tensors (on any device) as floats, in one device-to-host read."""
    if not values:
        return {}
    read = torch.stack([v.detach().double().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, read))


class StepMeter:
    """Throughput between two ``read()`` calls.

    ``update(samples, flops)`` after each optimizer step with this rank's samples and model
    FLOPs (training, i.e. 3x forward); ``read()`` returns global samples/s, per-device TFLOP/s,
    MFU (fraction of ``peak_tflops``) and peak memory, then restarts the window.
    """

    def __init__(self, world_size: int = 1, peak_tflops: Optional[float] = None) -> None:
        self.world_size = world_size
        self.peak_tflops = peak_tflops if peak_tflops is not None else device_peak_tflops()
        self._reset()

    def _reset(self) -> None:
        self._t0 = time.perf_counter()
        self._samples = 0
        self._flops = 0.0
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def update(self, samples: int, flops: float) -> None:
        self._samples += samples
        self._flops += flops

    def read(self) -> dict[str, float]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = max(time.perf_counter() - self._t0, 1e-9)
        tflops = self._flops / dt / 1e12
        out = {"samples_per_s": self._samples * self.world_size / dt, "tflops": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        if torch.cuda.is_available():
            out["mem_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        else:
            import resource
            out["mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # RSS, CPU runs
        self._reset()
        return out


def format_metrics(step: int, metrics: Mapping[str, Any]) -> str:
    parts = [f"step {step}"]
    for key, value in metrics.items():
        if key == "mfu":
            parts.append(f"mfu {100 * value:.1f}%")
        elif key == "lr":
            parts.append(f"lr {value:.3e}")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        elif isinstance(value, Mapping):
            parts.append(f"{key} " + ",".join(f"{k}={v}" for k, v in value.items()) if value else f"{key} -")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


def log_step(step: int, metrics: Mapping[str, Any], logger: Optional[logging.Logger] = None) -> None:
    """One line per logging step, rank 0 only."""
    if rank() == 0:
        (logger or get_logger()).info(format_metrics(step, metrics))


__all__ = ["get_logger", "read_scalars", "StepMeter", "log_step", "format_metrics", "device_peak_tflops", "rank"]
