"""The guarded loop's moves over a position-based loader, shared by pretraining and tokenizer
training: a rollback reloads the newest checkpoint before a bad streak, a seek moves the data past
the guard's skip windows. Fine-tuning derives its data position from the step instead
(``finetune/train.py``) and uses ``runtime.guard.rollback_tag`` directly.

A trainer mixing in ``GuardedLoop`` has ``guard``, ``ckpt``, ``engine``, ``loader`` (with
``seek``), ``rank``, ``step``, ``cfg.run.output_dir`` and ``_restore(state, rollback)``.
"""
from __future__ import annotations

from typing import Any

from .guard import rollback_tag
from .telemetry import get_logger

logger = get_logger("beit3.runtime.loop")


class GuardedLoop:
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


__all__ = ["GuardedLoop"]
