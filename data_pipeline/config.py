"""Typed configuration of the pretraining data pipeline.

``DataConfig`` is validated once in ``__post_init__``; ``DataConfig.from_dict`` builds the nested
dataclasses and rejects unknown keys (``DataConfigError`` names the dotted field).
``check_batch_arithmetic`` verifies at start-up that the global per-step counts divide over
ranks and gradient-accumulation micro-steps, and says which numbers to change when they do not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from beit3.model.config import ConfigError, FlatConfig
from beit3.model.config_io import build

SOURCES = ("image", "text", "pair")
COUNT_FIELDS = {"image": "images", "text": "texts", "pair": "pairs"}
INTERPOLATIONS = ("bicubic", "bilinear")
AUGMENT_ON = ("device", "cpu")


class DataConfigError(ConfigError):
    """A data-pipeline configuration value is wrong; the message names the field."""


class BatchArithmeticError(DataConfigError):
    """Global per-step counts do not divide over world_size * grad_accum."""


def _fail(name: str, msg: str) -> None:
    raise DataConfigError(f"data.{name}: {msg}")


@dataclass
class ImageMaskConfig:
    """Block-wise image masking (BEiT; exact-count variant of BEiT v2).

    The target count is ``num_patches`` when set, else ``round(ratio * P)`` (78 of 196 at 224 px
    with patch 16; BEiT v2's script uses 75: set ``num_patches: 75`` to reproduce it).
    """

    ratio: float = 0.4
    num_patches: int | None = None
    min_block_patches: int = 16
    max_block_patches: int | None = None  # None: up to the remaining target count
    min_aspect: float = 0.3
    max_aspect: float | None = None  # None: 1 / min_aspect

    def target(self, num_patches: int) -> int:
        return self.num_patches if self.num_patches is not None else int(round(self.ratio * num_patches))


@dataclass
class TextMaskConfig:
    """Text masking. Of the chosen positions, ``replace_mask`` become ``<mask>``, ``replace_random``
    a random non-special token, the rest keep their token. Default: all become ``<mask>`` (why: see
    ``masking.py``); BERT's 80/10/10 is ``replace_mask: 0.8, replace_random: 0.1``."""

    text_ratio: float = 0.15
    pair_ratio: float = 0.5
    replace_mask: float = 1.0
    replace_random: float = 0.0


@dataclass
class AugmentConfig:
    """Image augmentation of the paper: RandomResizedCrop, horizontal flip, color jitter 0.4."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_prob: float = 0.5
    color_jitter: float = 0.4
    interpolation: str = "bicubic"


@dataclass
class DataConfig(FlatConfig):
    """Everything the pretraining loader needs.

    Shard specs (per source): a list of brace patterns (``/d/img-{0000..0099}.tar``), globs
    (``/d/*.tar``) or manifest files (``/d/manifest.json``, written by the shard writers).
    ``images``/``texts``/``pairs``: GLOBAL samples per optimizer step (0 disables a source).
    """

    image_shards: list[str] = field(default_factory=list)
    text_shards: list[str] = field(default_factory=list)
    pair_shards: list[str] = field(default_factory=list)
    images: int = 2048
    texts: int = 2048
    pairs: int = 2048
    img_size: int = 224
    tokenizer_img_size: int | None = None  # None: img_size
    patch_size: int = 16
    # Text lengths include <s> and </s>. 128 for text-only segments keeps the text-only
    # sequence (128) below the image sequence (197) and covers 126-token segments; captions of
    # CC3M/CC12M/COCO are 10-30 tokens, 64 covers >99% and matches the official fine-tuning length.
    max_text_len: int = 128
    max_pair_text_len: int = 64
    image_mask: ImageMaskConfig = field(default_factory=ImageMaskConfig)
    text_mask: TextMaskConfig = field(default_factory=TextMaskConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    spm_path: str = ""
    num_workers: int = 4  # DataLoader worker processes per rank; each builds whole micro-batches
    prefetch_factor: int = 2  # micro-batches prefetched per worker
    pin_memory: bool = False
    worker_start_method: str = ""  # "" = torch's default (fork on Linux); "spawn" / "forkserver" also work
    seed: int = 0
    offline_codes: bool = False
    # where flip, color jitter, normalization and the tokenizer view run: "device" (in the training
    # step, the loader ships uint8 crops) or "cpu" (in the loader workers); same tensors either way
    augment_on: str = "device"
    shuffle_window_shards: int = 16  # samples are shuffled within windows of this many shards
    max_skip_retries: int = 64  # replacement draws for one bad sample before giving up
    # Remote shards (s3://, gs://, http(s)://, pipe:CMD) are read from whole-shard copies in a
    # node-local LRU cache shared by all ranks/workers of the node (shard_cache.py).
    cache_dir: str = ""  # "" = $TMPDIR/beit3-shard-cache-<uid>
    cache_size_gb: float = 64.0  # bound on the complete shards kept in cache_dir
    remote_retries: int = 5  # retries of a failed download (exponential backoff) before skipping the shard
    remote_backoff_s: float = 0.5  # first backoff; doubles per retry, at most 30 s
    remote_prefetch_threads: int = 2  # per process: fetch the current and next shuffle windows ahead (0: off)

    def __post_init__(self) -> None:
        for name in ("images", "texts", "pairs"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                _fail(name, f"must be an integer >= 0, got {v!r}")
        if self.images + self.texts + self.pairs == 0:
            _fail("images", "images, texts and pairs are all 0: nothing to load")
        if self.patch_size <= 0 or self.img_size % self.patch_size:
            _fail("img_size", f"{self.img_size} must be a positive multiple of patch_size={self.patch_size}")
        if self.tokenizer_img_size is not None and self.tokenizer_img_size <= 0:
            _fail("tokenizer_img_size", f"must be > 0, got {self.tokenizer_img_size}")
        for name in ("max_text_len", "max_pair_text_len"):
            if getattr(self, name) < 3:
                _fail(name, f"must be >= 3 (<s>, one token, </s>), got {getattr(self, name)}")
        m = self.image_mask
        if not 0.0 < m.ratio < 1.0:
            _fail("image_mask.ratio", f"must be in (0, 1), got {m.ratio}")
        if m.num_patches is not None and not 0 < m.num_patches < self.num_patches:
            _fail("image_mask.num_patches", f"must be in (0, {self.num_patches}), got {m.num_patches}")
        if m.min_block_patches < 1:
            _fail("image_mask.min_block_patches", f"must be >= 1, got {m.min_block_patches}")
        if not 0.0 < m.min_aspect <= 1.0 or (m.max_aspect is not None and m.max_aspect < m.min_aspect):
            _fail("image_mask.min_aspect", f"need 0 < min_aspect <= 1 <= max_aspect, got {m.min_aspect}, {m.max_aspect}")
        t = self.text_mask
        for name in ("text_ratio", "pair_ratio"):
            if not 0.0 < getattr(t, name) < 1.0:
                _fail(f"text_mask.{name}", f"must be in (0, 1), got {getattr(t, name)}")
        if t.replace_mask < 0 or t.replace_random < 0 or t.replace_mask + t.replace_random > 1.0 + 1e-9:
            _fail("text_mask.replace_mask", "replace_mask, replace_random must be >= 0 and sum to <= 1")
        a = self.augment
        if not 0.0 < a.crop_scale[0] <= a.crop_scale[1] <= 1.0:
            _fail("augment.crop_scale", f"need 0 < lo <= hi <= 1, got {a.crop_scale}")
        if not 0.0 < a.crop_ratio[0] <= a.crop_ratio[1]:
            _fail("augment.crop_ratio", f"need 0 < lo <= hi, got {a.crop_ratio}")
        if not 0.0 <= a.flip_prob <= 1.0:
            _fail("augment.flip_prob", f"must be in [0, 1], got {a.flip_prob}")
        if not 0.0 <= a.color_jitter < 1.0:
            _fail("augment.color_jitter", f"must be in [0, 1), got {a.color_jitter}")
        if a.interpolation not in INTERPOLATIONS:
            _fail("augment.interpolation", f"must be one of {INTERPOLATIONS}, got {a.interpolation!r}")
        if self.num_workers < 0:
            _fail("num_workers", f"must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            _fail("prefetch_factor", f"must be >= 1, got {self.prefetch_factor}")
        if self.worker_start_method not in ("", "fork", "spawn", "forkserver"):
            _fail("worker_start_method", f"must be '', fork, spawn or forkserver, got {self.worker_start_method!r}")
        if self.augment_on not in AUGMENT_ON:
            _fail("augment_on", f"must be one of {AUGMENT_ON}, got {self.augment_on!r}")
        if self.shuffle_window_shards < 1:
            _fail("shuffle_window_shards", f"must be >= 1, got {self.shuffle_window_shards}")
        if self.max_skip_retries < 1:
            _fail("max_skip_retries", f"must be >= 1, got {self.max_skip_retries}")
        _check_remote(self)

    def require_inputs(self, sources: tuple[str, ...] | None = None) -> None:
        """Start-up check (loaders call it): every enabled source has shards, text needs spm_path."""
        sources = self.active_sources if sources is None else sources
        for src in sources:
            if not self.shards(src):
                _fail(f"{src}_shards", f"{COUNT_FIELDS[src]}={self.count(src)} but no shard pattern is given")
        if ("text" in sources or "pair" in sources) and not self.spm_path:
            _fail("spm_path", "texts/pairs are enabled but no SentencePiece model is given")

    # ---- derived -------------------------------------------------------------------------
    @property
    def tok_img_size(self) -> int:
        return self.tokenizer_img_size or self.img_size

    def count(self, source: str) -> int:
        """Global samples per step of ``source`` ('image', 'text' or 'pair')."""
        return getattr(self, COUNT_FIELDS[source])

    def shards(self, source: str) -> list[str]:
        return list(getattr(self, f"{source}_shards"))

    @property
    def active_sources(self) -> tuple[str, ...]:
        return tuple(s for s in SOURCES if self.count(s) > 0)

    # ---- (de)serialization -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DataConfig":
        """Build from nested dicts (YAML); unknown keys raise ``DataConfigError``."""
        return build(cls, data, "data", DataConfigError)


def _check_remote(cfg: DataConfig) -> None:
    if isinstance(cfg.cache_size_gb, bool) or not isinstance(cfg.cache_size_gb, (int, float)) or not cfg.cache_size_gb > 0:
        _fail("cache_size_gb", f"must be a number > 0, got {cfg.cache_size_gb!r}")
    for name in ("remote_retries", "remote_prefetch_threads"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            _fail(name, f"must be an integer >= 0, got {v!r}")
    if isinstance(cfg.remote_backoff_s, bool) or not isinstance(cfg.remote_backoff_s, (int, float)) \
            or not 0 <= cfg.remote_backoff_s <= 600:
        _fail("remote_backoff_s", f"must be a number in [0, 600], got {cfg.remote_backoff_s!r}")
    if not isinstance(cfg.cache_dir, str):
        _fail("cache_dir", f"must be a path string, got {cfg.cache_dir!r}")


def check_batch_arithmetic(cfg: DataConfig, world_size: int, grad_accum: int = 1) -> dict[str, int]:
    """Per-rank micro-batch size of every source; raises ``BatchArithmeticError`` naming the
    fields and the numbers to change when a global count does not divide by world_size*grad_accum."""
    if world_size < 1 or grad_accum < 1:
        raise BatchArithmeticError(f"world_size={world_size} and grad_accum={grad_accum} must be >= 1")
    div = world_size * grad_accum
    problems = []
    for src in SOURCES:
        n = cfg.count(src)
        if n % div:
            lo, hi = (n // div) * div, (n // div + 1) * div
            options = f"{lo} or {hi}" if lo > 0 else f"{hi}"
            problems.append(f"data.{COUNT_FIELDS[src]}={n} (set it to {options})")
    if problems:
        nonzero = [cfg.count(s) for s in SOURCES if cfg.count(s)]
        g = math.gcd(*nonzero)
        accums = [a for a in range(1, 65) if g % (world_size * a) == 0]
        hint = (f", or use grad_accum in {accums[:8]} at world_size={world_size}" if accums
                else f"; no grad_accum works at world_size={world_size} (the counts' gcd is {g})")
        raise BatchArithmeticError(
            f"global per-step counts must divide by world_size*grad_accum = {world_size}*{grad_accum} = {div}: "
            + "; ".join(problems) + hint)
    return {src: cfg.count(src) // div for src in SOURCES}


__all__ = ["DataConfig", "ImageMaskConfig", "TextMaskConfig", "AugmentConfig", "DataConfigError",
           "BatchArithmeticError", "check_batch_arithmetic", "SOURCES"]
