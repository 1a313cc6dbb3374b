"""The per-pixel half of the image augmentation, vectorized over a micro-batch, on any device.

Loader workers decode, crop and resize to uint8 (``crops`` [B,3,S,S], plus ``tok_crops``
[B,3,St,St] when the tokenizer view has another size) and draw everything random from the
per-sample generator: ``flip`` bool [B], ``jitter`` float32 [B,3] (brightness, contrast,
saturation factors) and ``jitter_order`` int8 [B,3] (the order the three are applied in).
``finish_views`` turns those into the model view (flipped, jittered, normalized to [-1, 1]) and
the tokenizer view (flipped, [0, 1]). It runs in the training step (``data.augment_on: device``,
host-to-device traffic is the uint8 crop: an eighth of two float32 views) or in the loader workers
(``augment_on: cpu``); the arithmetic is the same, so both give the same tensors within float
tolerance. The jitter is torchvision's tensor ``ColorJitter`` arithmetic (blend with black, the
mean grey level and the grey image; ITU-R 601 luma; clamp to [0, 1] after each step).
"""
from __future__ import annotations

from typing import Any, MutableMapping

import numpy as np
import torch
from torch import Tensor

AUG_KEYS = ("crops", "tok_crops", "flip", "jitter", "jitter_order")
_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def draw_jitter(strength: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Factors ~ U[1-s, 1+s] for (brightness, contrast, saturation) and a random order of the three.

    Draws ``rng.random(6)`` exactly when ``strength > 0`` (as the PIL path always did), else nothing:
    identity factors, natural order."""
    if strength <= 0:
        return np.ones(3, np.float32), np.arange(3, dtype=np.int8)
    u = rng.random(6)
    return (1.0 - strength + 2.0 * strength * u[3:]).astype(np.float32), np.argsort(u[:3]).astype(np.int8)


def _gray(x: Tensor) -> Tensor:
    """[B,3,H,W] -> [B,1,H,W] luma."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def jitter_(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Color jitter of float ``x`` [B,3,H,W] in [0, 1], in place; ``factors`` [B,3], ``order`` [B,3].

    Each op is a blend ``f*x + (1-f)*m``: m = 0 (brightness), the image's mean grey (contrast),
    the grey image (saturation); step t applies op ``order[:, t]`` to every image at once."""
    factors, order = factors.to(x.device, torch.float32), order.to(x.device, torch.long)
    for t in range(3):
        op = order[:, t].view(-1, 1, 1, 1)  # [B,1,1,1]
        f = factors.gather(1, order[:, t:t + 1]).view(-1, 1, 1, 1).to(x.dtype)  # [B,1,1,1]
        gray = _gray(x)  # [B,1,H,W]
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # [B,1,1,1]
        # (1-f)*m: m = 0 (brightness), mean (contrast) or gray (saturation), without a per-pixel select
        sat = (op == 2).to(x.dtype) * (1.0 - f)  # [B,1,1,1]
        con = (op == 1).to(x.dtype) * (1.0 - f) * mean  # [B,1,1,1]
        x.mul_(f).add_(gray * sat + con).clamp_(0.0, 1.0)
    return x


def _flip(x: Tensor, flip: Tensor) -> Tensor:
    """Mirror the images of ``x`` [B,C,H,W] where ``flip`` [B] is set (a select: no host sync on CUDA)."""
    return torch.where(flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


def finish_views(src: MutableMapping[str, Any], dtype: torch.dtype = torch.float32) -> MutableMapping[str, Any]:
    """Replace the uint8 crops and augmentation parameters of one source's micro-batch by
    ``images`` [B,3,S,S] (``dtype``, in [-1, 1]) and, without offline codes, ``tokenizer_images``
    [B,3,St,St] (float32, [0, 1]); on the device the tensors are on. A batch without ``crops``
    (text, or views already finished) is returned unchanged."""
    if "crops" not in src:
        return src
    crops, flip = src.pop("crops"), src.pop("flip")
    tok = src.pop("tok_crops", None)
    factors, order = src.pop("jitter"), src.pop("jitter_order")
    x = _flip(crops.float().div_(255.0), flip)  # [B,3,S,S] in [0, 1]
    if "codes" not in src:
        src["tokenizer_images"] = x.clone() if tok is None else _flip(tok.float().div_(255.0), flip)
    src["images"] = jitter_(x, factors, order).sub_(0.5).div_(0.5).to(dtype)
    return src


def h2d_bytes_per_image(src: MutableMapping[str, Any]) -> float:
    """Bytes of image tensors (views, crops, codes, augmentation parameters) per image of a micro-batch."""
    keys = AUG_KEYS + ("images", "tokenizer_images", "codes", "image_mask")
    tensors = [src[k] for k in keys if isinstance(src.get(k), Tensor)]
    n = tensors[0].shape[0]
    return sum(t.numel() * t.element_size() for t in tensors) / n


__all__ = ["finish_views", "jitter_", "draw_jitter", "h2d_bytes_per_image", "AUG_KEYS"]
