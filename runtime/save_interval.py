"""Checkpoint interval from the cost of a save and the cluster's failure rate (Young/Daly).

Young (1974) / Daly (2006), first order: with a save that stalls training for ``C`` seconds and a
mean time between failures ``M`` seconds, the interval ``sqrt(2 C M)`` minimizes the expected time
lost (saves ``C / T`` per second of training plus half an interval of rework per failure).

``run.save_every: auto`` uses :class:`AutoSaveInterval`: the first checkpoint is written after
``first_save_step`` steps; its measured cost (the seconds training was blocked) and the measured
step time give the interval in steps, which is logged once and used for the rest of the run.

The default MTBF is the public anchor of the Llama 3 report (Meta, 2024): 419 unexpected
interruptions in 54 days of pretraining on 16,384 H100s, i.e. a per-GPU failure rate that
scales with the job's GPU count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

LLAMA3_FAILURES, LLAMA3_DAYS, LLAMA3_GPUS = 419, 54, 16384


def failures_per_gpu_hour() -> float:
    """The Llama 3 anchor as a per-GPU rate: 419 / (54 d x 24 h x 16,384 GPUs)."""
    return LLAMA3_FAILURES / (LLAMA3_DAYS * 24 * LLAMA3_GPUS)


def job_mtbf_hours(gpus: int, rate_per_gpu_hour: Optional[float] = None) -> float:
    """MTBF of a job on ``gpus`` GPUs when each fails independently at ``rate_per_gpu_hour``."""
    if gpus < 1:
        raise ValueError(f"gpus={gpus}: must be >= 1")
    rate = failures_per_gpu_hour() if rate_per_gpu_hour is None else rate_per_gpu_hour
    return 1.0 / (rate * gpus)


def young_daly_interval(save_s: float, mtbf_s: float) -> float:
    """Seconds of training between checkpoints: ``sqrt(2 * save_s * mtbf_s)``."""
    if save_s < 0 or mtbf_s <= 0:
        raise ValueError(f"save_s={save_s}, mtbf_s={mtbf_s}: need save_s >= 0 and mtbf_s > 0")
    return math.sqrt(2.0 * save_s * mtbf_s)


def expected_loss_fraction(interval_s: float, save_s: float, mtbf_s: float, restart_s: float = 0.0) -> float:
    """Fraction of wall time lost: saves (``save_s / interval_s``) plus, per failure, half an
    interval of rework and the restart (first order, interval << MTBF)."""
    return save_s / interval_s + (interval_s / 2.0 + restart_s) / mtbf_s


@dataclass
class AutoSaveInterval:
    """``run.save_every: auto``: the save interval in steps, from the first save's measured cost.

    ``due(step)`` says whether to save after ``step``; after the first save call
    ``record(save_s, step_s)`` with the seconds training was blocked by it and the mean seconds
    per optimizer step; it sets ``steps`` and returns the log line.
    """

    mtbf_hours: float
    first_save_step: int = 100
    min_steps: int = 1
    max_steps: Optional[int] = None  # cap (e.g. a fixed upper bound on lost work)
    steps: Optional[int] = None  # the interval once measured
    interval_s: Optional[float] = None
    anchor: int = 0  # the step of the measured save: later saves at anchor + k * steps

    def __post_init__(self) -> None:
        if self.mtbf_hours <= 0:
            raise ValueError(f"mtbf_hours={self.mtbf_hours}: must be > 0")
        if self.first_save_step < 1 or self.min_steps < 1:
            raise ValueError("first_save_step and min_steps must be >= 1")

    @classmethod
    def for_gpus(cls, gpus: int, mtbf_hours: Optional[float] = None, **kw) -> "AutoSaveInterval":
        """The given MTBF, else the Llama 3 per-GPU rate times ``gpus``."""
        return cls(mtbf_hours=mtbf_hours if mtbf_hours is not None else job_mtbf_hours(gpus), **kw)

    def due(self, step: int) -> bool:
        if self.steps is None:
            return step >= self.first_save_step
        return step > self.anchor and (step - self.anchor) % self.steps == 0

    def record(self, save_s: float, step_s: float, step: Optional[int] = None) -> str:
        """Set the interval from the measured save (seconds blocked) and step time; the log line."""
        if step_s <= 0:
            raise ValueError(f"step_s={step_s}: must be > 0")
        mtbf_s = self.mtbf_hours * 3600.0
        self.interval_s = young_daly_interval(save_s, mtbf_s)
        steps = max(self.min_steps, int(round(self.interval_s / step_s)))
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        self.steps = steps
        self.anchor = self.first_save_step if step is None else step
        lost = expected_loss_fraction(steps * step_s, save_s, mtbf_s)
        return (f"save_every=auto: {steps} steps ({steps * step_s / 60:.1f} min) = Young/Daly "
                f"sqrt(2 x {save_s:.2f} s save x {self.mtbf_hours:.1f} h MTBF) / {step_s:.3f} s per step; "
                f"expected loss {100 * lost:.2f}% of wall time")


__all__ = ["LLAMA3_FAILURES", "LLAMA3_DAYS", "LLAMA3_GPUS", "failures_per_gpu_hour", "job_mtbf_hours",
           "young_daly_interval", "expected_loss_fraction", "AutoSaveInterval"]
