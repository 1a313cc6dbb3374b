"""VQ-KD configuration: ``VQKDConfig``, its presets and the normalization constants."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import ConfigError
from ..config import FlatConfig


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_DROPPED_PREFIXES = ("loss", "teacher", "scaling")
FORMAT_TAG = "beit3-vqkd"


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VQKDConfig(FlatConfig):
    """Size and quantizer settings of a VQ-KD tokenizer (validated once, unknown keys rejected).

    The patch grid ``img_size // patch_size`` must equal the BEiT-3 model's patch grid.
    ``teacher_dim`` is the width of the regressed teacher features (512 CLIP ViT-B/16, 768 DINO).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 768
    decoder_depth: int = 3
    decoder_num_heads: int = 12
    num_codes: int = 8192
    code_dim: int = 32
    teacher_dim: int = 512
    ema_decay: float = 0.99
    commitment_beta: float = 1.0
    kmeans_init: bool = True
    kmeans_iters: int = 10
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"VQKDConfig.{name}={getattr(self, name)!r}: {msg}")

        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                     "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "num_codes",
                     "code_dim", "teacher_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.img_size % self.patch_size:
            fail("img_size", f"must be divisible by patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            fail("embed_dim", f"must be divisible by num_heads={self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            fail("decoder_embed_dim", f"must be divisible by decoder_num_heads={self.decoder_num_heads}")
        if not 0.0 < self.ema_decay < 1.0:
            fail("ema_decay", "must be in (0, 1)")
        if self.commitment_beta < 0:
            fail("commitment_beta", "must be >= 0")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 0:
            fail("kmeans_iters", "must be a non-negative integer")
        if self.mlp_ratio <= 0:
            fail("mlp_ratio", "must be positive")
        if self.layer_norm_eps <= 0:
            fail("layer_norm_eps", "must be positive")


# Presets. ``base`` is the recommended release (decoder 3x768x12, CLIP teacher, 97% usage).
VQKD_PRESETS: dict[str, VQKDConfig] = {
    "tiny": VQKDConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                       decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                       num_codes=128, code_dim=16, teacher_dim=64),
    "base": VQKDConfig(decoder_depth=3, teacher_dim=512),
    "base_1x768x12_clip": VQKDConfig(decoder_depth=1, teacher_dim=512),
    "base_3x768x12_clip": VQKDConfig(decoder_depth=3, teacher_dim=512),
    "base_1x768x12_dino": VQKDConfig(decoder_depth=1, teacher_dim=768),
}


def get_vqkd_config(preset: str, **overrides: Any) -> VQKDConfig:
    """A preset with validated overrides, e.g. ``get_vqkd_config("base", decoder_depth=1)``."""
    if preset not in VQKD_PRESETS:
        raise ConfigError(f"preset={preset!r}: unknown VQ-KD preset; choose one of {sorted(VQKD_PRESETS)}")
    return VQKD_PRESETS[preset].replace(**overrides)
