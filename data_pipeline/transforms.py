"""Image views of the paper's augmentation, driven by an explicit numpy generator.

``sample_crop`` draws RandomResizedCrop parameters exactly as torchvision's
``RandomResizedCrop.get_params`` does (same algorithm, including the center-crop fallback) plus
a flip flag; ``apply_crop`` renders a view from those parameters. The offline visual-token
command uses both, so precomputed codes match the views the loader renders. The loader renders
the crop as uint8 (``crop_resize``, from a reduced-DCT decode when the crop is at least twice the
output: ``open_reduced``); flip, color jitter and normalization are in ``augment.py``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class CropParams:
    """Crop box in ORIGINAL image pixels (``i`` = top, ``j`` = left, ``h``, ``w``) and flip."""

    i: int
    j: int
    h: int
    w: int
    flip: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CropParams":
        return cls(int(d["i"]), int(d["j"]), int(d["h"]), int(d["w"]), bool(d["flip"]))


def sample_crop(img: Image.Image | tuple[int, int], rng: np.random.Generator,
                scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                flip_prob: float = 0.5) -> CropParams:
    """RandomResizedCrop box (torchvision's algorithm) and a flip flag. ``img``: image or (width, height)."""
    width, height = img.size if isinstance(img, Image.Image) else img
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    u = rng.random(40)
    box = None
    for t in range(10):
        target_area = area * (scale[0] + u[4 * t] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[4 * t + 1] * (log_ratio[1] - log_ratio[0]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(u[4 * t + 2] * (height - h + 1))
            j = int(u[4 * t + 3] * (width - w + 1))
            box = (i, j, h, w)
            break
    if box is None:  # fallback: center crop at the clamped ratio
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, int(round(width / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = height, int(round(height * max(ratio)))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = bool(rng.random() < flip_prob)
    return CropParams(*box, flip=flip)


def crop_pil(img: Image.Image, p: CropParams, size: int, interpolation: str = "bicubic") -> Image.Image:
    """Crop ``p`` resized to ``size`` x ``size`` (then flipped), as a PIL image."""
    # crop, then resize (as torchvision's resized_crop; PIL's resize(box=) would differ at the edges)
    out = crop_resize(img, p, size, interpolation)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if p.flip else out


def draft_scale(p: CropParams, out_size: int) -> int:
    """JPEG DCT reduction (1, 2, 4 or 8) for crop ``p`` rendered at ``out_size``: the largest that
    keeps the reduced crop at least ``out_size`` on its short side (so 1 below twice the output)."""
    s = 8
    while s > 1 and min(p.h, p.w) < s * out_size:
        s //= 2
    return s


def open_reduced(img: Image.Image, p: CropParams, out_size: int) -> float:
    """Ask a lazily opened JPEG to decode at the DCT reduction ``draft_scale`` allows (``Image.draft``);
    returns the scale it will decode at (1.0: full size; PNG and others always decode fully)."""
    s = draft_scale(p, out_size)
    if s == 1 or img.format != "JPEG":
        return 1.0
    width, height = img.size
    got = img.draft("RGB", (width // s, height // s))
    return 1.0 if got is None else width / got[1][2]


def crop_resize(img: Image.Image, p: CropParams, size: int, interpolation: str = "bicubic",
                scale: float = 1.0) -> Image.Image:
    """Crop ``p`` (original-image pixels) resized to ``size`` x ``size``, not flipped. ``img`` may be
    decoded at 1/``scale`` of the original (``open_reduced``): the box is then mapped onto it."""
    if scale == 1.0:  # crop, then resize (as torchvision's resized_crop; resize(box=) differs at the edges)
        return img.crop((p.j, p.i, p.j + p.w, p.i + p.h)).resize((size, size), _RESAMPLE[interpolation])
    box = (p.j / scale, p.i / scale, min((p.j + p.w) / scale, img.width), min((p.i + p.h) / scale, img.height))
    return img.resize((size, size), _RESAMPLE[interpolation], box=box)


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> uint8 [3, H, W] (a channel-first view of a fresh HWC array)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> float [3, H, W] in [0, 1]."""
    arr = np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy needs one)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def apply_crop(img: Image.Image, params: CropParams, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """The tokenizer view: crop + flip, float [3, size, size] in [0, 1] (no jitter)."""
    return to_tensor(crop_pil(img, params, size, interpolation))


def normalize_(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1] (mean = std = 0.5), in place."""
    return x.sub_(0.5).div_(0.5)


__all__ = ["CropParams", "sample_crop", "apply_crop", "crop_pil", "crop_resize", "draft_scale", "open_reduced",
           "to_uint8", "to_tensor", "normalize_"]
