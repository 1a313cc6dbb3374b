"""RandAugment as the official BEiT-3 fine-tuning uses it (VQAv2 and captioning recipes).

The official ``RandomAugment(2, 7, augs=[...])`` (unilm ``beit3/randaug.py``, from BLIP) draws
2 of 10 ops with replacement, applies each with probability 0.5 at level 7 of 10, and fills
uncovered pixels with grey (128). This is torchvision's ``RandAugment`` with that op list and
the official magnitude table per level ``l`` (``num_magnitude_bins=11``, levels 0..10):

| op | official argument at level l | here (torchvision ``_apply_op`` magnitude) |
|---|---|---|
| Identity, AutoContrast, Equalize | none | none |
| Brightness, Sharpness | factor ``1.8 l / 10 + 0.1`` (unsigned) | ``1.8 l / 10 - 0.9`` (factor ``1 + m``) |
| ShearX, ShearY | ``+-0.3 l / 10`` | same (signed) |
| TranslateX, TranslateY | ``+-10 l / 10`` pixels | same (signed) |
| Rotate | ``+-30 l / 10`` degrees | same (signed) |

The official code runs on OpenCV, torchvision on PIL: pixels near the borders of warped images
and the rounding of enhanced ones differ slightly; the ops and magnitudes are the same.
"""
from __future__ import annotations

import functools
import random
from typing import Callable, Optional, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, RandAugment
from torchvision.transforms.autoaugment import _apply_op

OFFICIAL_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness", "ShearX", "ShearY",
                "TranslateX", "TranslateY", "Rotate")
_FILL = [128.0, 128.0, 128.0]
T = TypeVar("T")


class OfficialRandAugment(RandAugment):
    """torchvision ``RandAugment`` restricted to the official ops and magnitudes, each drawn op
    applied with probability ``prob`` (0.5 officially). Randomness from the torch generator."""

    def __init__(self, num_ops: int = 2, magnitude: int = 7, prob: float = 0.5) -> None:
        super().__init__(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=11,
                         interpolation=InterpolationMode.NEAREST, fill=_FILL)
        self.prob = prob

    def _augmentation_space(self, num_bins: int, image_size: tuple[int, int]) -> dict[str, tuple[Tensor, bool]]:
        enhance = torch.linspace(-0.9, 0.9, num_bins)  # factor 1 + m = 1.8 l / 10 + 0.1
        space = {
            "Identity": (torch.tensor(0.0), False),
            "AutoContrast": (torch.tensor(0.0), False),
            "Equalize": (torch.tensor(0.0), False),
            "Brightness": (enhance, False),
            "Sharpness": (enhance, False),
            "ShearX": (torch.linspace(0.0, 0.3, num_bins), True),
            "ShearY": (torch.linspace(0.0, 0.3, num_bins), True),
            "TranslateX": (torch.linspace(0.0, 10.0, num_bins), True),
            "TranslateY": (torch.linspace(0.0, 10.0, num_bins), True),
            "Rotate": (torch.linspace(0.0, 30.0, num_bins), True),
        }
        return {k: space[k] for k in OFFICIAL_OPS}

    def forward(self, img: Image.Image) -> Image.Image:  # type: ignore[override]
        """``num_ops`` ops drawn with replacement, each applied with probability ``prob``."""
        width, height = img.size
        space = self._augmentation_space(self.num_magnitude_bins, (height, width))
        names = list(space)
        for _ in range(self.num_ops):
            name = names[int(torch.randint(len(names), (1,)).item())]
            magnitudes, signed = space[name]
            apply = float(torch.rand(1).item()) < self.prob
            sign = -1.0 if signed and bool(torch.randint(2, (1,)).item()) else 1.0
            if not apply:
                continue
            m = float(magnitudes[self.magnitude].item()) if magnitudes.ndim > 0 else 0.0
            img = _apply_op(img, name, sign * m, interpolation=self.interpolation, fill=self.fill)
        return img


def seeded(fn: Callable[[], T], rng: np.random.Generator) -> T:
    """``fn()`` with the global generators it may use (torch, numpy, ``random``) seeded from
    ``rng`` and restored afterwards, so a sample's view depends on its (seed, epoch, index)
    only, not on the worker or on what ran before."""
    seed = int(rng.integers(2 ** 31))
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            return fn()
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def randaugment_view(img: Image.Image, aug: Optional[OfficialRandAugment], rng: np.random.Generator) -> Image.Image:
    """``aug(img)`` seeded from ``rng`` (``seeded``); ``img`` unchanged without ``aug``."""
    return img if aug is None else seeded(lambda: aug(img), rng)


@functools.lru_cache(maxsize=4)
def timm_imagenet_train_transform(img_size: int) -> Callable[[Image.Image], Tensor]:
    """The official ImageNet training view (unilm ``build_imagenet_transform``): timm's
    ``create_transform`` with RandomResizedCrop (0.08-1, bicubic), flip, RandAugment
    ``rand-m9-mstd0.5-inc1``, ImageNet mean/std and random erasing (p 0.25, per-pixel, 1 box).
    Needs ``timm`` (``pip install timm``)."""
    from timm.data import create_transform

    return create_transform(input_size=img_size, is_training=True, color_jitter=0.4,
                            auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=0.25,
                            re_mode="pixel", re_count=1, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


__all__ = ["OfficialRandAugment", "OFFICIAL_OPS", "seeded", "randaugment_view", "timm_imagenet_train_transform"]
