"""Exponential moving average of the model weights (fp32 shadow), swapped in for evaluation."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after each optimizer step.

    Needs the full parameters on every rank (ZeRO stages 0-2); the trainer refuses it under ZeRO-3.
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow: dict[str, Tensor] = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for n, p in module.named_parameters():
            self.shadow[n].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def applied(self, module: nn.Module) -> Iterator[None]:
        """Temporarily load the EMA weights into ``module``."""
        backup = {n: p.detach().clone() for n, p in module.named_parameters()}
        for n, p in module.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            for n, p in module.named_parameters():
                p.copy_(backup[n])

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        self.shadow = {n: state[n].float().clone() for n in self.shadow}


__all__ = ["EMA"]
