"""Divergence guard: skip bad steps on every rank, roll back on spikes, stop a diverging run.

Per micro-step, before ``engine.backward``, every rank all-reduces ``(loss not finite, loss)``.
When any rank's loss is not finite, or the global mean loss exceeds ``spike_factor`` x an EMA of
past step losses, every rank backpropagates a NaN loss instead, so DeepSpeed's own overflow
path (an invalid global gradient norm, agreed across ranks) discards the whole optimizer step
on every rank, zeroes the gradients and leaves the LR schedule where it was. DeepSpeed's own
skips (non-finite gradients with a finite loss) are counted through ``engine.was_step_applied()``.
The verdict never leaves the device during a step (the loss is multiplied by 1 or NaN); the host
learns of a discarded step from DeepSpeed's skip and reads the reason only then.

A spike, or ``max_consecutive_skips`` skipped steps in a row, asks for a rollback: every rank
reloads the newest complete checkpoint older than the bad streak and the data steps of the
streak are skipped from then on (they are kept in the client state, so a later resume skips
them too and the sample sequence stays deterministic). More than ``max_rollbacks`` rollbacks
within ``rollback_window`` steps raise ``DivergenceError`` (exit code 3).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from beit3.model.config import ConfigError

from .telemetry import get_logger

logger = get_logger("beit3.runtime.guard")
EXIT_DIVERGED = 3
GUARD_SIDECAR = "guard_state.json"  # the guard's skip windows under output_dir, rewritten at each rollback


class DivergenceError(RuntimeError):
    """The run diverges: rollbacks keep recurring, or there is no good checkpoint to go back to."""


@dataclass
class GuardConfig:
    """``guard.*``: when a step is skipped, when the run rolls back, when it gives up."""

    enabled: bool = True
    spike_factor: float = 3.0  # a step loss above this x the loss EMA is a spike (0: off)
    ema_decay: float = 0.98  # EMA of applied step losses (bias-corrected)
    spike_warmup_steps: int = 20  # applied steps before spikes are detected
    max_consecutive_skips: int = 5  # this many skipped steps in a row -> rollback
    max_rollbacks: int = 3  # more rollbacks than this within rollback_window steps -> exit 3
    rollback_window: int = 1000

    def __post_init__(self) -> None:
        if self.spike_factor != 0 and self.spike_factor <= 1:
            raise ConfigError(f"guard.spike_factor={self.spike_factor}: must be > 1 (or 0 to disable)")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"guard.ema_decay={self.ema_decay}: must be in (0, 1)")
        for name in ("spike_warmup_steps", "max_rollbacks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"guard.{name}={getattr(self, name)}: must be >= 0")
        for name in ("max_consecutive_skips", "rollback_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"guard.{name}={getattr(self, name)}: must be >= 1")


@dataclass
class SkipGuardConfig(GuardConfig):
    """The guard with spike detection off by default (fine-tuning, the tokenizer): losses of small or
    mixed batches move by more than 3x in healthy runs. Non-finite losses are still skipped on every
    rank and a streak of them rolls back; ``guard.spike_factor`` turns spikes on."""

    spike_factor: float = 0.0


class DivergenceGuard:
    """Agreed skip / rollback / stop decisions of one run. Every method is called on every rank."""

    def __init__(self, cfg: GuardConfig, world_size: int) -> None:
        self.cfg, self.world = cfg, world_size
        self.ema, self.ema_count = 0.0, 0
        self.skipped_steps = 0  # optimizer steps not applied (ours and DeepSpeed's)
        self.consecutive = 0
        self.skip_windows: list[list[int]] = []  # inclusive data-step ranges never trained on
        self.rollbacks: list[dict[str, Any]] = []
        self._micros: list[torch.Tensor] = []  # per micro-step of this step: [bad ranks, mean loss, spike]
        self._step_bad: Optional[torch.Tensor] = None  # 0-d bool on the device: this step is discarded
        self._step_sum: Optional[torch.Tensor] = None  # summed mean loss of this step's good micro-steps
        self._bad_applied: Optional[torch.Tensor] = None  # discarded steps the optimizer applied anyway
        self._bad_start: Optional[int] = None
        self.last_applied = True

    # ---- per micro-step ------------------------------------------------------------------------
    def check_micro(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss to backpropagate: ``loss``, or NaN on every rank when any rank's is bad.

        The verdict stays on the device (the loss is scaled by 1 or NaN): nothing here waits for it.
        """
        if not self.cfg.enabled:
            return loss
        value = loss.detach().float()
        finite = torch.isfinite(value)
        t = torch.stack([(~finite).float(), torch.where(finite, value, torch.zeros_like(value))])
        if self.world > 1:
            dist.all_reduce(t)
        bad, mean = t[0] > 0, t[1].double() / self.world
        spike = torch.zeros_like(bad)
        if self._spike_armed():
            spike = (mean > self.cfg.spike_factor * self._ema_value()) & ~bad
        self._micros.append(torch.stack([t[0].double(), mean, spike.double()]))
        good_mean = torch.where(bad, torch.zeros_like(mean), mean)
        self._step_sum = good_mean if self._step_sum is None else self._step_sum + good_mean
        flag = bad | spike
        self._step_bad = flag if self._step_bad is None else self._step_bad | flag
        scale = torch.where(self._step_bad, float("nan"), 1.0).to(loss.dtype)
        return loss * scale

    def _ema_value(self) -> Any:  # a float, or a 0-d float64 tensor on the device once steps were booked
        return self.ema / (1 - self.cfg.ema_decay ** self.ema_count) if self.ema_count else float("nan")

    def _spike_armed(self) -> bool:
        return self.cfg.spike_factor > 0 and self.ema_count >= max(self.cfg.spike_warmup_steps, 1)

    def _discard_reason(self) -> Optional[str]:
        """Why this step was discarded, from its micro-step records (read only for a skipped step)."""
        for bad_ranks, mean, spike in torch.stack(self._micros).tolist() if self._micros else ():
            if bad_ranks:
                return f"non-finite loss on {int(bad_ranks)} rank(s)"
            if spike:
                return (f"loss spike {mean:.4g} > {self.cfg.spike_factor} x EMA "
                        f"{float(self._ema_value()):.4g}")
        return None

    # ---- per optimizer step ----------------------------------------------------------------------
    def end_step(self, step: int, applied: bool) -> bool:
        """Book step ``step`` (``applied``: ``engine.was_step_applied()``); True asks for a rollback.

        An applied step reads nothing from the device: the guard discards a step by a NaN loss, so
        DeepSpeed's own (host-read) skip decision tells whether anything was discarded. A step the
        guard discarded but the optimizer applied is detected at the next ``metrics()`` / ``state_dict()``.
        """
        if not self.cfg.enabled:
            return False
        self.last_applied = applied
        spike = False
        if applied:
            if self._micros:
                mean = self._step_sum / len(self._micros)
                self.ema = self.cfg.ema_decay * self.ema + (1 - self.cfg.ema_decay) * mean
                self.ema_count += 1
                self._bad_applied = (self._step_bad if self._bad_applied is None
                                     else self._bad_applied | self._step_bad)
            self.consecutive, self._bad_start = 0, None
        else:
            reason = self._discard_reason() or "DeepSpeed skipped it (non-finite gradient norm)"
            spike = reason.startswith("loss spike")
            self.skipped_steps += 1
            self.consecutive += 1
            self._bad_start = step if self._bad_start is None else self._bad_start
            logger.warning("step %d skipped on every rank: %s (%d skipped so far)", step, reason, self.skipped_steps)
        self._micros, self._step_bad, self._step_sum = [], None, None
        return spike or self.consecutive >= self.cfg.max_consecutive_skips

    def check_applied(self) -> None:
        """Raise when a step the guard discarded was applied (an optimizer that does not skip
        non-finite gradients: the guard cannot work with it). Reads the device once."""
        if self._bad_applied is not None and bool(self._bad_applied):
            raise RuntimeError("a step the guard discarded (NaN loss) was applied by the optimizer; this "
                               "optimizer does not skip non-finite gradients, the guard cannot work with it")

    # ---- rollback ------------------------------------------------------------------------------
    def plan_rollback(self, step: int, complete: list[tuple[int, str]]) -> str:
        """Record a rollback at ``step``; returns the tag to reload from ``complete`` ((step, tag),
        oldest first). Raises ``DivergenceError`` when rollbacks recur or no good tag exists."""
        start = self._bad_start if self._bad_start is not None else step
        recent = [r for r in self.rollbacks if r["step"] > step - self.cfg.rollback_window]
        if len(recent) + 1 > self.cfg.max_rollbacks:
            raise DivergenceError(
                f"the run diverges: {len(recent) + 1} rollbacks within {self.cfg.rollback_window} steps "
                f"(guard.max_rollbacks={self.cfg.max_rollbacks}) at steps "
                f"{[r['step'] for r in recent] + [step]}; lower optim.lr or check the data")
        good = [(s, t) for s, t in complete if s < start]
        if not good:
            raise DivergenceError(f"the run diverges at step {step} and there is no complete checkpoint before "
                                  f"step {start} to roll back to; lower optim.lr or save earlier (run.save_every)")
        target_step, tag = good[-1]
        self.skip_windows.append([start, step])
        self.rollbacks.append({"step": step, "to": target_step, "skip": [start, step]})
        logger.warning("rollback at step %d: reloading %s, data steps %d-%d will be skipped (rollback %d)",
                       step, tag, start, step, len(self.rollbacks))
        self.consecutive, self._bad_start = 0, None
        return tag

    def next_data_step(self, step: int) -> int:
        """The first data step >= ``step`` outside every skip window."""
        moved = True
        while moved:
            moved = False
            for lo, hi in self.skip_windows:
                if lo <= step <= hi:
                    step, moved = hi + 1, True
        return step

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self.check_applied()
        return {"ema": float(self.ema), "ema_count": self.ema_count, "skipped_steps": self.skipped_steps,
                "skip_windows": [list(w) for w in self.skip_windows], "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: dict[str, Any], rollback: bool = False) -> None:
        """Resume (everything) or roll back (only the EMA of the checkpoint; skips, windows and
        rollbacks seen since are kept)."""
        self.ema, self.ema_count = float(state.get("ema", 0.0)), int(state.get("ema_count", 0))
        if rollback:
            return
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skip_windows = [list(w) for w in state.get("skip_windows", [])]
        self.rollbacks = list(state.get("rollbacks", []))

    def merge(self, state: dict[str, Any]) -> None:
        """Add the skip windows and rollbacks of ``state`` (the sidecar written at a rollback, which
        may be newer than the checkpoint a resume loads)."""
        windows = {tuple(w) for w in self.skip_windows} | {tuple(w) for w in state.get("skip_windows", [])}
        self.skip_windows = [list(w) for w in sorted(windows)]
        seen = {(r["step"], r["to"]) for r in self.rollbacks}
        self.rollbacks += [r for r in state.get("rollbacks", []) if (r["step"], r["to"]) not in seen]
        self.skipped_steps = max(self.skipped_steps, int(state.get("skipped_steps", 0)))

    def metrics(self) -> dict[str, int]:
        self.check_applied()
        return {"skipped_steps": self.skipped_steps, "rollbacks": len(self.rollbacks), "applied": int(self.last_applied)}


# ---- the run's side of a rollback (every trainer) -------------------------------------------------
def rollback_tag(guard: DivergenceGuard, ckpt: Any, step: int, output_dir: str, rank: int) -> str:
    """Plan a rollback at ``step`` over the checkpoints every rank holds complete (``ckpt``: a
    ``CheckpointManager``); rank 0 makes the new skip windows durable in ``output_dir`` at once, so
    a crash before the next save still skips them. Returns the tag to reload."""
    from .checkpointing import TAG_RE

    complete = [(int(TAG_RE.match(t).group(1)), t) for t in ckpt.agreed_complete_tags()]
    tag = guard.plan_rollback(step, complete)
    if rank == 0:
        path = Path(output_dir) / GUARD_SIDECAR
        path.with_suffix(".tmp").write_text(json.dumps(guard.state_dict()))
        os.replace(path.with_suffix(".tmp"), path)
    return tag


def merge_sidecar(guard: DivergenceGuard, output_dir: str, rank: int) -> None:
    """At resume: add the skip windows of a rollback made after the loaded checkpoint was saved
    (rank 0's file, broadcast to every rank)."""
    from .checkpointing import from_rank0

    sidecar = Path(output_dir) / GUARD_SIDECAR
    windows = from_rank0(json.loads(sidecar.read_text()) if rank == 0 and sidecar.is_file() else None)
    if windows:
        guard.merge(windows)


__all__ = ["GuardConfig", "SkipGuardConfig", "DivergenceGuard", "DivergenceError", "EXIT_DIVERGED", "GUARD_SIDECAR", "rollback_tag",
           "merge_sidecar"]
