"""Decoding and augmentation of one raw shard sample (a dict of member bytes) per source.

Every failure that is the data's fault raises ``SkipSample(reason)``; the loader counts the
reason and draws a deterministic replacement. Reasons: ``missing_field``, ``corrupt_image``,
``empty_text``, ``undecodable_text``, ``bad_tokens``, ``missing_codes``, ``shard_unreadable``.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import DataConfig
from .masking import BlockMaskGenerator, mask_text
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, TextTokenizer
from .augment import draw_jitter
from .transforms import CropParams, crop_resize, open_reduced, sample_crop, to_uint8

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
Image.MAX_IMAGE_PIXELS = 200_000_000  # bigger images are rejected as corrupt


class SkipSample(Exception):
    """The sample cannot be used; ``reason`` is the counter name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _field(sample: dict[str, Any], *names: str) -> tuple[str, bytes]:
    for n in names:
        if n in sample:
            return n, sample[n]
    raise SkipSample("missing_field", f"{sample.get('__key__')}: none of {names}")


def open_image(sample: dict[str, Any]) -> Image.Image:
    """The sample's image, opened lazily (header read, size known, pixels not yet decoded)."""
    _, data = _field(sample, *IMAGE_EXTS)
    try:
        return Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise SkipSample("corrupt_image", f"{sample.get('__key__')}: {e}") from None


def load_rgb(img: Image.Image, key: Any = None) -> Image.Image:
    """Decode an opened image (at the draft scale, if one was set) to RGB (``corrupt_image`` on failure)."""
    try:
        img.load()
        img = img.convert("RGB")
    except Exception as e:
        raise SkipSample("corrupt_image", f"{key}: {e}") from None
    if img.width < 1 or img.height < 1:
        raise SkipSample("corrupt_image", f"{key}: empty image")
    return img


def decode_image(sample: dict[str, Any]) -> Image.Image:
    """The sample's image as RGB, fully decoded (``missing_field`` / ``corrupt_image`` on failure)."""
    return load_rgb(open_image(sample), sample.get("__key__"))


def decode_text(sample: dict[str, Any]) -> str:
    _, data = _field(sample, "txt", "text", "caption")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
    except UnicodeDecodeError as e:
        raise SkipSample("undecodable_text", f"{sample.get('__key__')}: {e}") from None
    text = text.strip()
    if not text:
        raise SkipSample("empty_text", str(sample.get("__key__")))
    return text


class ImageViews:
    """One image's crop as uint8 (``crops``, ``tok_crops`` when the tokenizer view has its own size)
    plus its ``flip``, ``jitter`` and ``jitter_order`` (see ``augment.py``), or offline ``codes``;
    ``masker``. A crop at least twice the output size is decoded at a reduced JPEG DCT scale."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        a = cfg.augment
        self.scale, self.ratio, self.flip_prob = tuple(a.crop_scale), tuple(a.crop_ratio), a.flip_prob
        self.out_size = max(cfg.img_size, cfg.tok_img_size)
        m = cfg.image_mask
        self.masker = BlockMaskGenerator(cfg.grid_size, m.target(cfg.num_patches), m.min_block_patches,
                                         m.max_block_patches, m.min_aspect, m.max_aspect)

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """Crops of one sample; the mask is drawn afterwards from the same ``rng``, per batch
        (``self.masker.batch``), so that it is identical to ``self.masker(rng)`` here."""
        cfg, key = self.cfg, sample.get("__key__")
        codes = None
        if cfg.offline_codes:
            codes, params = self._offline_view(sample, rng)
        img = open_image(sample)
        if not cfg.offline_codes:
            params = sample_crop(img.size, rng, self.scale, self.ratio, self.flip_prob)
        elif params.i + params.h > img.height or params.j + params.w > img.width:
            raise SkipSample("missing_codes", f"{key}: crop {params} outside the image")
        factors, order = draw_jitter(cfg.augment.color_jitter, rng)
        scale = open_reduced(img, params, self.out_size)
        img, interp = load_rgb(img, key), cfg.augment.interpolation
        out: dict[str, Any] = {"crops": to_uint8(crop_resize(img, params, cfg.img_size, interp, scale))}
        if codes is not None:
            out["codes"] = torch.from_numpy(codes.astype(np.int64))
        elif cfg.tok_img_size != cfg.img_size:
            out["tok_crops"] = to_uint8(crop_resize(img, params, cfg.tok_img_size, interp, scale))
        out.update(flip=torch.tensor(params.flip), jitter=torch.from_numpy(factors),
                   jitter_order=torch.from_numpy(order))
        return out

    def _offline_view(self, sample: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, CropParams]:
        if "codes.npy" not in sample or "crops.json" not in sample:
            raise SkipSample("missing_codes", str(sample.get("__key__")))
        try:
            codes = np.load(io.BytesIO(sample["codes.npy"]), allow_pickle=False)
            crops = json.loads(sample["crops.json"])
            if codes.ndim != 2 or codes.shape[0] != len(crops) or codes.shape[1] != self.cfg.num_patches:
                raise ValueError(f"codes {codes.shape} vs {len(crops)} crops, {self.cfg.num_patches} patches")
            k = int(rng.integers(len(crops)))
            return codes[k], CropParams.from_dict(crops[k])
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise SkipSample("missing_codes", f"{sample.get('__key__')}: {e}") from None


class TextMasker:
    """Token ids -> <s> ids </s> (truncated to max_len), then masked; fixed-length arrays."""

    def __init__(self, tokenizer: TextTokenizer, cfg: DataConfig) -> None:
        self.tok = tokenizer
        self.mask_id = tokenizer.mask_id
        self.special = np.array([BOS_ID, PAD_ID, EOS_ID, UNK_ID, tokenizer.mask_id], dtype=np.int64)
        self.cfg = cfg.text_mask

    def __call__(self, body: np.ndarray, max_len: int, ratio: float, rng: np.random.Generator,
                 key: str = "") -> dict[str, torch.Tensor]:
        body = np.asarray(body, dtype=np.int64).reshape(-1)
        if body.size == 0:
            raise SkipSample("empty_text", key)
        if body.min() < 0 or body.max() >= self.mask_id:
            raise SkipSample("bad_tokens", f"{key}: ids outside [0, {self.mask_id})")
        room = max_len - 2
        if body.size > room:  # a random window of an over-long segment
            start = int(rng.integers(body.size - room + 1))
            body = body[start:start + room]
        ids = np.concatenate([[BOS_ID], body, [EOS_ID]])
        inp, chosen = mask_text(ids, ratio, rng, self.special, self.mask_id, self.cfg.replace_mask,
                                self.cfg.replace_random)
        n = ids.size
        text_ids = np.full(max_len, PAD_ID, dtype=np.int64)
        labels = np.full(max_len, PAD_ID, dtype=np.int64)
        tmask = np.zeros(max_len, dtype=bool)
        pad = np.ones(max_len, dtype=bool)
        text_ids[:n], labels[:n], tmask[:n], pad[:n] = inp, ids, chosen, False
        return {"text_ids": torch.from_numpy(text_ids), "text_labels": torch.from_numpy(labels),
                "text_mask": torch.from_numpy(tmask), "padding_mask": torch.from_numpy(pad)}


def text_body(sample: dict[str, Any], tokenizer: TextTokenizer) -> np.ndarray:
    """Pre-tokenized ``tokens.npy`` (text shards) or the tokenized ``txt`` field."""
    if "tokens.npy" in sample:
        try:
            return np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise SkipSample("bad_tokens", f"{sample.get('__key__')}: {e}") from None
    return np.asarray(tokenizer.encode(decode_text(sample)), dtype=np.int64)


__all__ = ["SkipSample", "decode_image", "open_image", "load_rgb", "decode_text", "ImageViews", "TextMasker", "text_body", "IMAGE_EXTS"]
