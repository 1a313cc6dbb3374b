"""Datasets and collation of the fine-tuning tasks, over index rows (``formats``).

Images are read from ``data_root / image_path``; an unreadable image drops its sample (the
batch reports ``skipped``), never the run. Train views: RandomResizedCrop (+ flip only for
classification, whose labels do not talk about left and right); eval views: a resize. Both are
normalized to [-1, 1] (mean = std = 0.5) with ``beit3.data_pipeline.transforms``.
Text: ``[BOS] text_segment[: max_len - 2] [EOS]``, right-padded with ``pad_id``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from beit3.data_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID
from beit3.data_pipeline.transforms import crop_pil, normalize_, sample_crop, to_tensor

from .augment import OfficialRandAugment, randaugment_view, seeded, timm_imagenet_train_transform

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageViewConfig:
    img_size: int
    train: bool
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = False
    randaug_ops: int = 0  # > 0: official RandAugment (``augment``) on training views
    randaug_magnitude: int = 7
    normalize: str = "inception"  # "inception": mean = std = 0.5; "imagenet": timm's ImageNet mean/std
    eval_center_crop: bool = False  # eval: shorter side to img_size, center crop (official ImageNet)
    train_transform: str = "beit3"  # "timm_imagenet": the official ImageNet training view (``augment``)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATIONS = ("inception", "imagenet")


def load_image(path: Path) -> Optional[Image.Image]:
    """RGB image, or None (logged) if it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        logger.warning("skipping unreadable image %s: %s", path, e)
        return None


def image_view(img: Image.Image, cfg: ImageViewConfig, rng: np.random.Generator) -> Tensor:
    """Normalized ``[3, S, S]`` view of ``img`` (training: crop, flip, RandAugment if on)."""
    if cfg.train and cfg.train_transform == "timm_imagenet":
        return seeded(lambda: timm_imagenet_train_transform(cfg.img_size)(img), rng)  # [3, S, S], normalized
    if cfg.train:
        p = sample_crop(img, rng, scale=cfg.crop_scale, flip_prob=0.5 if cfg.flip else 0.0)
        out = crop_pil(img, p, cfg.img_size)
        if cfg.randaug_ops > 0:
            out = randaugment_view(out, OfficialRandAugment(cfg.randaug_ops, cfg.randaug_magnitude), rng)
    elif cfg.eval_center_crop:
        w, h, S = *img.size, cfg.img_size  # torchvision Resize(S) then CenterCrop(S)
        nw, nh = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
        out = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = int(round((nw - cfg.img_size) / 2.0)), int(round((nh - cfg.img_size) / 2.0))
        out = out.crop((left, top, left + cfg.img_size, top + cfg.img_size))
    else:
        out = img.resize((cfg.img_size, cfg.img_size), Image.Resampling.BICUBIC)
    x = to_tensor(out)
    if cfg.normalize == "imagenet":
        return x.sub_(torch.tensor(IMAGENET_MEAN)[:, None, None]).div_(torch.tensor(IMAGENET_STD)[:, None, None])
    return normalize_(x)


def text_ids(segment: Sequence[int], max_len: int) -> list[int]:
    return [BOS_ID] + list(segment)[: max_len - 2] + [EOS_ID]


def pad_texts(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest: ids ``[B, L]`` and padding mask ``[B, L]`` (True = pad)."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD_ID, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return ids, torch.arange(L)[None] >= torch.tensor([len(s) for s in seqs])[:, None]


def mask_caption(ids: list[int], mask_prob: float, mask_id: int, rng: np.random.Generator,
                 random_vocab: int = 0) -> tuple[list[int], list[bool], list[int]]:
    """Mask a caption ``[BOS] w.. [EOS]`` for training: ``(input ids, masked flags, targets)``;
    every position after BOS (EOS included) may be masked; targets are the original ids at the
    masked positions, in order.

    ``random_vocab == 0``: ``max(int((L - 1) p), 1)`` positions, all replaced by ``mask_id``.
    ``random_vocab > 0`` (the official captioning data): ``min(round(L p), L - 1)`` (at least 1)
    positions, each replaced by ``mask_id`` with probability 0.8, kept with 0.1, or replaced by
    a random id in ``[3, random_vocab - 1]`` with 0.1 (still predicted)."""
    L = len(ids)
    if random_vocab > 0:
        k = max(min(int(L * mask_prob + 0.5), L - 1), 1)
    else:
        k = min(max(int((L - 1) * mask_prob), 1), L - 1)
    pos = np.sort(rng.choice(np.arange(1, L), size=k, replace=False))
    text = list(ids)
    for p in pos:
        u = rng.random() if random_vocab > 0 else 0.0
        text[p] = mask_id if u < 0.8 else ids[p] if u < 0.9 else int(rng.integers(3, random_vocab))
    masked = np.zeros(L, dtype=bool)
    masked[pos] = True
    return text, masked.tolist(), [ids[p] for p in pos]


class TaskDataset(Dataset):
    """One index file of one task. Items are dicts (None when the image is unreadable)."""

    def __init__(self, rows: list[dict], task: str, data_root: str | Path, view: ImageViewConfig,
                 max_text_len: int = 64, num_answers: int = 0, mask_id: Optional[int] = None,
                 mask_prob: float = 0.6, seed: int = 0, random_vocab: int = 0) -> None:
        self.rows, self.task, self.root, self.view = rows, task, Path(data_root), view
        self.max_text_len, self.num_answers = max_text_len, num_answers
        self.mask_id, self.mask_prob, self.seed = mask_id, mask_prob, seed
        self.random_vocab = random_vocab  # > 0: the official 80/10/10 caption masking (``mask_caption``)
        self.epoch = 0
        if task == "captioning" and view.train and mask_id is None:
            raise ValueError("captioning training needs mask_id")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, rel: str, rng: np.random.Generator) -> Optional[Tensor]:
        img = load_image(self.root / rel)
        return None if img is None else image_view(img, self.view, rng)

    def __getitem__(self, index: int) -> Optional[dict[str, Any]]:
        row = self.rows[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        image = self._image(row["image_path"], rng)
        if image is None:
            return None
        item: dict[str, Any] = {"index": index, "images": image}
        if self.task == "classification":
            item["labels"] = int(row["label"])
        elif self.task == "nlvr2":
            image2 = self._image(row["image2_path"], rng)
            if image2 is None:
                return None
            item.update(images2=image2, labels=int(row["label"]), text=text_ids(row["text_segment"], self.max_text_len))
        elif self.task == "vqa":
            target = torch.zeros(self.num_answers)
            for lab, score in zip(row["labels"], row["scores"]):
                target[lab] = score
            item.update(text=text_ids(row["text_segment"], self.max_text_len), targets=target)
        elif self.task == "retrieval":
            item["text"] = text_ids(row["text_segment"], self.max_text_len)
        elif self.task == "captioning" and self.view.train:
            ids = text_ids(row["text_segment"], self.max_text_len)
            text, masked, targets = mask_caption(ids, self.mask_prob, self.mask_id, rng, self.random_vocab)
            item.update(text=text, masked=masked, targets=targets)
        return item


def collate(items: list[Optional[dict[str, Any]]]) -> dict[str, Any]:
    """Stack a batch, dropping unreadable samples (``skipped`` counts them)."""
    kept = [it for it in items if it is not None]
    batch: dict[str, Any] = {"skipped": len(items) - len(kept), "size": len(kept)}
    if not kept:
        return batch
    batch["index"] = torch.tensor([it["index"] for it in kept])
    batch["images"] = torch.stack([it["images"] for it in kept])
    if "images2" in kept[0]:
        batch["images2"] = torch.stack([it["images2"] for it in kept])
    if "text" in kept[0]:
        batch["text_ids"], batch["text_padding_mask"] = pad_texts([it["text"] for it in kept])
    if "labels" in kept[0]:
        batch["labels"] = torch.tensor([it["labels"] for it in kept])
    if "masked" in kept[0]:
        L = batch["text_ids"].shape[1]
        m = torch.zeros(len(kept), L, dtype=torch.bool)
        for i, it in enumerate(kept):
            m[i, : len(it["masked"])] = torch.tensor(it["masked"])
        batch["masked"] = m
        batch["targets"] = torch.tensor([t for it in kept for t in it["targets"]])
    elif "targets" in kept[0]:
        batch["targets"] = torch.stack([it["targets"] for it in kept])
    return batch


__all__ = ["ImageViewConfig", "load_image", "image_view", "text_ids", "pad_texts", "mask_caption", "TaskDataset",
           "collate"]
