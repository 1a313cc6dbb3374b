"""Typed model configuration and the one preset registry.

``BEiT3Config`` is validated once, in ``__post_init__``; ``from_dict`` rejects unknown keys.
Presets live in ``PRESETS`` (one registry, like torchtitan's ``llama3_configs``); ``get_config``
returns a preset with validated overrides.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

LAYOUTS = ("released", "paper")
ATTN_BACKENDS = ("auto", "math", "sdpa", "triton")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


class FlatConfig:
    """Mixin for flat frozen dataclass configs: ``to_dict``, a ``from_dict`` that rejects
    unknown keys, ``replace`` (re-validated), and the patch grid of ``img_size``/``patch_size``."""

    img_size: int
    patch_size: int

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))

    def replace(self, **overrides: Any):
        return type(self).from_dict({**self.to_dict(), **overrides})


@dataclass(frozen=True)
class BEiT3Config(FlatConfig):
    """Architecture of the Multiway Transformer.

    layout:
        ``released``: per-modality (vision / language) copies of q/k/v/out projections, the
        inner attention LayerNorm, both block LayerNorms and the whole FFN; only the softmax
        over the joint sequence is shared (the official base/large checkpoints).
        ``paper``: shared self-attention (and its LayerNorms), vision and language FFN experts
        in every layer, and a vision-language FFN expert in the top ``num_vl_layers`` layers
        for the fused image-text sequence.
    """

    layout: str = "released"
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_text_positions: int = 1024
    num_vl_layers: int = 0
    num_visual_tokens: int = 8192
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    normalize_output: bool = True
    attn_backend: str = "auto"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"BEiT3Config.{name}={getattr(self, name)!r}: {msg}")

        if self.layout not in LAYOUTS:
            fail("layout", f"must be one of {LAYOUTS}")
        if self.attn_backend not in ATTN_BACKENDS:
            fail("attn_backend", f"must be one of {ATTN_BACKENDS}")
        for name in ("embed_dim", "depth", "num_heads", "ffn_dim", "img_size", "patch_size",
                     "in_chans", "vocab_size", "max_text_positions", "num_visual_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.embed_dim % self.num_heads:
            fail("embed_dim", f"must be divisible by num_heads={self.num_heads}")
        if self.img_size % self.patch_size:
            fail("img_size", f"must be divisible by patch_size={self.patch_size}")
        if not 0 <= self.num_vl_layers <= self.depth:
            fail("num_vl_layers", f"must be between 0 and depth={self.depth}")
        if self.layout == "released" and self.num_vl_layers:
            fail("num_vl_layers", "the released layout has no vision-language expert; use layout='paper'")
        for name in ("drop_path_rate", "dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(name, "must be in [0, 1)")
        if self.layer_norm_eps <= 0:
            fail("layer_norm_eps", "must be positive")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_vision_tokens(self) -> int:
        """Patches plus CLS: the split position of a fused sequence."""
        return self.num_patches + 1


# One registry of size presets. ``tiny`` is for tests and the CPU demo.
PRESETS: dict[str, BEiT3Config] = {
    "tiny": BEiT3Config(embed_dim=64, depth=2, num_heads=4, ffn_dim=256, img_size=32,
                        patch_size=8, max_text_positions=128),
    "base": BEiT3Config(embed_dim=768, depth=12, num_heads=12, ffn_dim=3072),
    "large": BEiT3Config(embed_dim=1024, depth=24, num_heads=16, ffn_dim=4096),
    "giant": BEiT3Config(layout="paper", embed_dim=1408, depth=40, num_heads=16, ffn_dim=6144,
                         patch_size=14, num_vl_layers=3),
}
_DEFAULT_VL_LAYERS = {"tiny": 1, "base": 2, "large": 3, "giant": 3}


def get_config(preset: str, **overrides: Any) -> BEiT3Config:
    """A preset with validated overrides, e.g. ``get_config("base", layout="paper")``.

    Switching a preset to the ``paper`` layout without naming ``num_vl_layers`` gives it the
    vision-language FFN in its top layers (tiny 1, base 2, large 3, giant 3).
    """
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r}: unknown preset; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset].to_dict()
    if overrides.get("layout") == "paper" and "num_vl_layers" not in overrides:
        overrides = {**overrides, "num_vl_layers": _DEFAULT_VL_LAYERS[preset]}
    if overrides.get("layout") == "released" and "num_vl_layers" not in overrides:
        overrides = {**overrides, "num_vl_layers": 0}
    cfg.update(overrides)
    return BEiT3Config.from_dict(cfg)


__all__ = ["BEiT3Config", "ConfigError", "PRESETS", "get_config", "LAYOUTS", "ATTN_BACKENDS"]
