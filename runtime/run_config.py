"""The ``run`` section every trainer shares (``RunSection``): pretraining
(``pretrain.train.RunConfig``), tokenizer training (``pretrain.train_vqkd.RunConfig``) and
fine-tuning (``finetune.config.RunConfig``) each extend it with their own fields and defaults;
a field means the same in all three, and the supervisor relaunches any of them with
``run.resume=auto``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from beit3.model.config import ConfigError


@dataclass
class RunSection:
    output_dir: str = "runs/beit3"  # checkpoints/, metrics.jsonl, hang/, faults.jsonl, the exports
    deepspeed_config: str = ""  # the DeepSpeed JSON (twin of --deepspeed_config; each trainer has a default)
    log_every: int = 10
    save_every: int = 1000  # optimizer steps between checkpoints
    keep_last: int = 3  # complete checkpoints kept
    resume: str = "auto"  # auto (the newest complete checkpoint) | none | a tag such as step_00001000
    seed: int = 0
    tensorboard: bool = True  # through DeepSpeed's monitor, under output_dir/tensorboard
    dist_timeout_s: float = 1800.0  # no progress for this long is a hang (watchdog); collectives get +60 s

    def __post_init__(self) -> None:
        for name in self._at_least_one():
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name}={getattr(self, name)}: must be >= 1")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"run.dist_timeout_s={self.dist_timeout_s}: must be > 0")
        if not self.resume:
            raise ConfigError("run.resume: empty; use auto, none or a checkpoint tag")

    def _at_least_one(self) -> tuple[str, ...]:
        return ("log_every", "save_every", "keep_last")

    def tensorboard_dir(self) -> Optional[str]:
        """Where DeepSpeed's monitor writes (``output_dir/tensorboard``), or None with ``tensorboard`` off."""
        return os.path.join(self.output_dir, "tensorboard") if self.tensorboard else None


__all__ = ["RunSection"]
