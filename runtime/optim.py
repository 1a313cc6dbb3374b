"""Optimizer parameter groups and the warmup + cosine learning-rate schedule.

Shared by pretraining and fine-tuning: weight decay skips norms, biases and the model's
``no_weight_decay()`` names; optional layer-wise lr decay (``decay^(L + 1 - layer_id)``,
embeddings id 0, ``blocks.i`` id ``i + 1``, everything else ``L + 1``) and a head lr scale.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from beit3.model.config import ConfigError

_EMBED_NAMES = ("text_embed", "vision_embed", "vision_pos", "text_pos")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


@dataclass
class OptimConfig:
    """AdamW + warmup/cosine; defaults are the BEiT-3 pretraining recipe."""

    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 10_000
    total_steps: int = 1_000_000
    grad_clip: float = 3.0
    # warmup as the official fine-tuning scheduler (unilm beit3/utils.py cosine_scheduler:
    # np.linspace(0, lr, warmup_steps), step 0 at lr 0, the peak at step warmup - 1; its
    # --warmup_lr never reaches it); False: lr x (step + 1) / warmup_steps
    warmup_from_zero: bool = False

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr}: must be positive")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optim.min_lr={self.min_lr}: must be in [0, optim.lr={self.lr}]")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay}: must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name}={getattr(self, name)}: must be in [0, 1)")
        if self.total_steps <= 0:
            raise ConfigError(f"optim.total_steps={self.total_steps}: must be positive")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps}: must be in [0, optim.total_steps]")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip={self.grad_clip}: must be >= 0 (0 disables)")


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise lr decay."""
    m = _BLOCK_RE.search(name)
    if m:
        return int(m.group(1)) + 1
    if any(part in _EMBED_NAMES for part in name.split(".")):
        return 0
    return num_layers + 1


def param_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: Optional[float] = None,
                 num_layers: Optional[int] = None,
                 layer_id_fn: Optional[Callable[[str, int], int]] = None,
                 head_lr_scale: float = 1.0, head_prefixes: Sequence[str] = ()) -> list[dict]:
    """AdamW groups keyed by (decay, lr scale); each group carries ``lr`` and ``lr_scale``."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    if layer_decay is not None and num_layers is None:
        raise ValueError("layer_decay needs num_layers")
    layer_id_fn = layer_id_fn or layer_id
    groups: dict[tuple[bool, float], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        scale = 1.0
        if layer_decay is not None:
            scale = layer_decay ** (num_layers + 1 - layer_id_fn(name, num_layers))
        if head_prefixes and name.startswith(tuple(head_prefixes)):
            scale *= head_lr_scale
        key = (decay, scale)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0,
                           "lr": lr * scale, "lr_scale": scale}
        groups[key]["params"].append(p)
    return list(groups.values())


def lr_factor(step: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine to ``min_lr``."""
    if step < cfg.warmup_steps:
        if cfg.warmup_from_zero:
            return step / (cfg.warmup_steps - 1) if cfg.warmup_steps > 1 else 0.0
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(step: int, cfg: OptimConfig) -> float:
    return cfg.lr * lr_factor(step, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over every group's own initial lr (so lr scales are kept)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


__all__ = ["OptimConfig", "param_groups", "layer_id", "lr_factor", "lr_at", "build_scheduler"]
