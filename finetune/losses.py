"""Task losses: soft-target cross-entropy (label smoothing, mixup/cutmix), VQA BCE, and the
retrieval contrastive loss with features gathered across data-parallel ranks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def soft_target_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy against a target distribution ``[B, C]`` (mixup / label smoothing)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def one_hot_smoothed(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def vqa_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Official VQA loss: BCE-with-logits (mean over all entries) x number of answers."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


@dataclass
class MixupConfig:
    """Mixup / CutMix (batch mode) with label smoothing; all off by default."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0  # probability of mixing a batch at all
    switch_prob: float = 0.5  # when both are on: probability of CutMix instead of mixup
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        from beit3.model.config import ConfigError

        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ConfigError(f"mixup.{name}={getattr(self, name)}: must be >= 0")
        for name in ("prob", "switch_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"mixup.{name}={getattr(self, name)}: must be in [0, 1]")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"mixup.label_smoothing={self.label_smoothing}: must be in [0, 1)")

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


class Mixup:
    """Mixes a batch with its flipped order; returns images and soft targets ``[B, C]``."""

    def __init__(self, cfg: MixupConfig, num_classes: int, seed: Any = 0) -> None:  # an int or a tuple of ints
        self.cfg = cfg
        self.num_classes = num_classes
        self.rng = np.random.default_rng(seed)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        targets = one_hot_smoothed(labels, self.num_classes, cfg.label_smoothing)
        if not cfg.active or self.rng.random() > cfg.prob:
            return images, targets
        use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or self.rng.random() < cfg.switch_prob)
        alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
        lam = float(self.rng.beta(alpha, alpha))
        flipped = images.flip(0)
        if use_cutmix:
            H, W = images.shape[-2:]
            cut = math.sqrt(1.0 - lam)
            ch, cw = int(H * cut), int(W * cut)
            cy, cx = int(self.rng.integers(H)), int(self.rng.integers(W))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
            images = images.clone()
            images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(H * W)  # the area actually kept
        else:
            images = images * lam + flipped * (1.0 - lam)
        return images, targets * lam + targets.flip(0) * (1.0 - lam)


@dataclass
class CaptionLossConfig:
    """Captioning token loss of the official recipe: label smoothing (``1 - eps`` on the target,
    ``eps / (V - 1)`` on every other token) and drop-worst (after ``drop_worst_after`` optimizer
    steps, the ``drop_worst_ratio`` share of masked tokens with the largest loss is left out).
    Both off by default; the official COCO recipe uses 0.1, 0.2 and 12000."""

    label_smoothing: float = 0.0
    drop_worst_ratio: float = 0.0
    drop_worst_after: int = 0

    def __post_init__(self) -> None:
        from beit3.model.config import ConfigError

        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"caption_loss.label_smoothing={self.label_smoothing}: must be in [0, 1)")
        if not 0 <= self.drop_worst_ratio < 1:
            raise ConfigError(f"caption_loss.drop_worst_ratio={self.drop_worst_ratio}: must be in [0, 1)")
        if self.drop_worst_after < 0:
            raise ConfigError(f"caption_loss.drop_worst_after={self.drop_worst_after}: must be >= 0")


def caption_token_loss(logits: Tensor, targets: Tensor, cfg: CaptionLossConfig, step: int) -> Tensor:
    """Mean over masked tokens ``[M, V]`` of KL(smoothed one-hot || softmax) (cross-entropy
    less the target's constant entropy, so 0 for a perfect prediction, as the official loss).
    Once ``step > cfg.drop_worst_after`` only the ``int(M x (1 - ratio))`` smallest losses count."""
    logp = F.log_softmax(logits.float(), dim=-1)  # [M, V]
    V = logp.shape[-1]
    eps = cfg.label_smoothing
    per_token = -logp.gather(1, targets.view(-1, 1)).squeeze(1)  # [M] cross-entropy of the target
    if eps > 0:
        other = eps / (V - 1)
        ce = (1 - eps) * per_token + other * (-logp.sum(-1) - per_token)  # [M]
        entropy = -(1 - eps) * math.log(1 - eps) - eps * math.log(other)
        per_token = ce - entropy
    if cfg.drop_worst_ratio > 0 and step > cfg.drop_worst_after:
        keep = int(per_token.shape[0] * (1 - cfg.drop_worst_ratio))
        per_token = torch.topk(per_token, k=max(keep, 1), largest=False).values
    return per_token.mean()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather of ``[B_r, D]`` rows (B_r may differ per rank) whose backward sums the gradient
    of every rank's copy and keeps this rank's rows (all_reduce based: gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:  # type: ignore[override]
        rank, top = dist.get_rank(), max(sizes)
        padded = x.new_zeros((top,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.rank, ctx.sizes = rank, sizes
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])  # [sum B_r, D]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]], None


def gather_features(x: Tensor) -> tuple[Tensor, int]:
    """Features of every data-parallel rank ``[sum B_r, D]`` (with gradients) and the offset of
    this rank's rows in it. Ranks may hold different local batch sizes (skipped samples)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes_int = [int(s.item()) for s in sizes]
    return _GatherWithGrad.apply(x, sizes_int), sum(sizes_int[: dist.get_rank()])


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                     max_scale: float = 100.0) -> tuple[Tensor, Tensor]:
    """CLIP loss over the global batch: this rank's rows against every rank's features.

    Returns ``(loss, logits_per_image)``. The loss of each rank covers its own rows; their mean
    over ranks (what data-parallel averaging optimizes) equals the single-process loss on the
    concatenated batch, and so do the gradients (the gather's backward sums all ranks' terms).
    """
    all_img, offset = gather_features(image_features)  # [N, D]
    all_txt, _ = gather_features(text_features)
    scale = logit_scale.exp().clamp(max=max_scale)
    B = image_features.shape[0]
    labels = torch.arange(offset, offset + B, device=image_features.device)
    logits_i2t = scale * image_features.float() @ all_txt.float().t()  # [B, N]
    logits_t2i = scale * text_features.float() @ all_img.float().t()  # [B, N]
    loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
    return loss, logits_i2t


def reduce_mean(value: Tensor, group: Optional[object] = None) -> Tensor:
    """Mean of a scalar over data-parallel ranks (for logging)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value.detach()
    v = value.detach().clone()
    dist.all_reduce(v, group=group)
    return v / dist.get_world_size(group)


__all__ = ["soft_target_cross_entropy", "one_hot_smoothed", "vqa_loss", "MixupConfig", "Mixup",
           "CaptionLossConfig", "caption_token_loss",
           "gather_features", "contrastive_loss", "reduce_mean"]
