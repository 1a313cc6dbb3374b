"""Masked data modeling: the one pretraining loss of BEiT-3.

Every micro-step runs the three sources through the same model on every rank (images: MIM;
texts: MLM; pairs: MIM + MLM on the fused sequence), so ZeRO-3 sees the same modules on all
ranks in the same order. The loss is ``MIM + MLM``: cross-entropy averaged over all masked
patches (images and pairs) plus cross-entropy averaged over all masked text tokens (texts and
pairs); each part is also logged on its own with its accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from beit3.data_pipeline.augment import finish_views

SOURCES = ("image", "text", "pair")
TargetFn = Callable[[Tensor, Tensor], Tensor]  # (tokenizer_images, image_mask) -> codes at masked positions


@dataclass
class PartStats:
    """Summed loss, correct predictions and count of one part (e.g. pair/mim)."""

    loss_sum: Tensor
    correct: Tensor
    count: int


@dataclass
class MDMResult:
    loss: Tensor
    parts: dict[str, PartStats] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Per-part mean loss and accuracy, plus the combined mim/mlm values (floats, this rank)."""
        out: dict[str, float] = {"loss": float(self.loss.detach())}
        for kind in ("mim", "mlm"):
            parts = {k: v for k, v in self.parts.items() if k.endswith(kind)}
            n = sum(p.count for p in parts.values())
            if n:
                out[f"{kind}_loss"] = float(sum(p.loss_sum.detach() for p in parts.values())) / n
                out[f"{kind}_acc"] = float(sum(p.correct for p in parts.values())) / n
        for name, p in self.parts.items():
            if p.count:
                out[f"{name}_loss"] = float(p.loss_sum.detach()) / p.count
                out[f"{name}_acc"] = float(p.correct) / p.count
        return out


def _part(logits: Tensor, labels: Tensor) -> PartStats:
    logits = logits.float()
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(-1) == labels).sum().detach()
    return PartStats(loss_sum, correct, int(labels.numel()))


def to_device(batch: Mapping[str, Any], device: torch.device, float_dtype: torch.dtype) -> dict[str, Any]:
    """Tensors of one source to ``device``; float tensors to the model's dtype (tokenizer view excepted)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            dtype = float_dtype if v.is_floating_point() and k == "images" else None
            v = v.to(device, dtype=dtype, non_blocking=True)
        out[k] = v
    return out


def image_labels(src: Mapping[str, Any], targets: Optional[TargetFn]) -> Tensor:
    """Visual-token labels at the masked patches: offline codes, or the frozen tokenizer online."""
    mask = src["image_mask"]
    if "codes" in src:
        return src["codes"].long()[mask]
    if targets is None:
        raise RuntimeError("batch has no offline codes and no image tokenizer is configured (targets.tokenizer_path)")
    return targets(src["tokenizer_images"], mask)


def mdm_loss(model: Callable[..., Any], batch: Mapping[str, Any], targets: Optional[TargetFn],
             device: torch.device, float_dtype: torch.dtype = torch.float32) -> MDMResult:
    """Forward the micro-batch's sources and return the combined MDM loss with per-part stats."""
    parts: dict[str, PartStats] = {}
    for source in SOURCES:
        if source not in batch:
            continue
        src = finish_views(to_device(batch[source], device, float_dtype), float_dtype)  # augment_on: device
        has_image = "images" in src
        has_text = "text_ids" in src
        out = model(images=src.get("images"), image_mask=src.get("image_mask") if has_image else None,
                    text_ids=src.get("text_ids"), text_padding_mask=src.get("padding_mask"),
                    text_mask=src.get("text_mask") if has_text else None)
        if has_image:
            parts[f"{source}/mim"] = _part(out.mim_logits, image_labels(src, targets))
        if has_text:
            parts[f"{source}/mlm"] = _part(out.mlm_logits, src["text_labels"][src["text_mask"]])
    loss = None
    for kind in ("mim", "mlm"):
        group = [p for k, p in parts.items() if k.endswith(kind)]
        n = sum(p.count for p in group)
        if group:  # an empty selection still contributes a zero that keeps the graph connected
            term = sum(p.loss_sum for p in group) / max(n, 1)
            loss = term if loss is None else loss + term
    if loss is None:
        raise ValueError("micro-batch has no source (expected 'image', 'text' and/or 'pair')")
    return MDMResult(loss=loss, parts=parts)


__all__ = ["mdm_loss", "MDMResult", "PartStats", "image_labels", "to_device", "SOURCES"]
