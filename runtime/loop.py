"""What every trainer's loop shares around its checkpoints.

``ResumableRun`` (all three trainers): ``run.resume`` at start-up: the newest complete checkpoint
(``auto``), a tag, or ``none``; the skip windows of a rollback made after that checkpoint was saved are
merged into the guard. ``GuardedLoop`` (pretraining and tokenizer training): the guarded loop's moves
over a position-based loader: a rollback reloads the newest checkpoint before a bad streak, a seek moves
the data past the guard's skip windows. Fine-tuning derives its data position from the step instead
(``finetune/train.py``) and uses ``runtime.guard.rollback_tag`` directly.

A trainer mixing them in has ``guard``, ``ckpt``, ``engine``, ``rank``, ``step``, ``cfg.run.resume``,
``cfg.run.output_dir``, ``_restore(state, rollback)`` and, for ``GuardedLoop``, ``loader`` (with ``seek``).
"""
from __future__ import annotations

from typing import Any

from .guard import merge_sidecar, rollback_tag
from .telemetry import get_logger

logger = get_logger("beit3.runtime.loop")


class ResumableRun:
    def resume_checkpoint(self) -> bool:
        """Restores the checkpoint ``run.resume`` names; False when starting fresh (``none``, or nothing
        complete to resume). Collective."""
        if self.cfg.run.resume == "none":
            return False
        state = self.ckpt.load(self.engine, self.cfg.run.resume)
        if state is None:
            return False
        self._restore(state)
        merge_sidecar(self.guard, self.cfg.run.output_dir, self.rank)
        return True


class GuardedLoop(ResumableRun):
    def _rollback(self, batches: Any) -> Any:
        """Every rank reloads the newest good checkpoint; returns the new batch iterator."""
        tag = rollback_tag(self.guard, self.ckpt, self.step, self.cfg.run.output_dir, self.rank)
        batches.close()
        self._restore(self.ckpt.load(self.engine, tag), rollback=True)
        return iter(self.loader)

    def _seek(self, batches: Any, step: int) -> Any:
        """Move the data past skip windows: the next batch is data step ``step + 1``."""
        batches.close()
        self.loader.seek(step)
        logger.warning("skipping data steps %d-%d (rolled back from there)", self.step + 1, step)
        self.step = step
        return iter(self.loader)


__all__ = ["GuardedLoop", "ResumableRun"]
