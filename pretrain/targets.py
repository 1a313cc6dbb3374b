"""Visual-token targets for masked image modeling: online (frozen tokenizer in the step) and
offline (codes precomputed into the shards).

Online::

    targets = VisualTokenTargets.from_checkpoint("tokenizer.pt", device="cuda")
    labels = targets(batch["tokenizer_images"], batch["image_mask"])   # LongTensor [M]

Offline: ``python -m beit3.pretrain.targets --tokenizer tokenizer.pt --shards in/manifest.json
--out out/ --views 4`` writes new shards that copy every field and add ``codes.npy`` (int16
``[K, P]``) and ``crops.json`` (K views ``{"i", "j", "h", "w", "flip"}`` in original-image
pixels); with ``data.offline_codes: true`` the loader picks one view per sample and yields
``codes [B, P]``; ``labels_from_codes`` then replaces the tokenizer forward.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from beit3.data_pipeline.augment import finish_views
from beit3.model.vqkd import VQKD, freeze, load_tokenizer

logger = logging.getLogger(__name__)


class VisualTokenTargets:
    """Frozen tokenizer -> labels at the masked positions (row-major order of ``image_mask``)."""

    def __init__(self, tokenizer: VQKD, dtype: Optional[torch.dtype] = None) -> None:
        self.tokenizer = freeze(tokenizer)
        self.dtype = dtype
        self.num_patches = tokenizer.config.num_patches

    @classmethod
    def from_checkpoint(cls, path: str, device: str | torch.device = "cpu",
                        dtype: Optional[torch.dtype] = None, **overrides: Any) -> "VisualTokenTargets":
        """From our tokenizer file or a released BEiT v2 ``vqkd_encoder_base_decoder_*`` file."""
        return cls(load_tokenizer(path, **overrides).to(device), dtype=dtype)

    @property
    def num_codes(self) -> int:
        return self.tokenizer.config.num_codes

    def _check_mask(self, image_mask: Tensor, batch: int) -> Tensor:
        if image_mask.shape != (batch, self.num_patches):
            raise ValueError(f"image_mask {tuple(image_mask.shape)} does not match the tokenizer's patch grid "
                             f"[B={batch}, P={self.num_patches}]")
        return image_mask.bool()

    @torch.no_grad()
    def codes(self, tokenizer_images: Tensor) -> Tensor:
        """All codes ``[B, P]`` of ``tokenizer_images [B, 3, H, W]`` in [0, 1]."""
        device = next(self.tokenizer.parameters()).device
        return self.tokenizer.codes(tokenizer_images.to(device, non_blocking=True), dtype=self.dtype)

    def __call__(self, tokenizer_images: Tensor, image_mask: Tensor) -> Tensor:
        """``codes[image_mask]``: LongTensor ``[M]``, M = number of True entries of the mask."""
        mask = self._check_mask(image_mask, tokenizer_images.shape[0])
        codes = self.codes(tokenizer_images)
        return codes[mask.to(codes.device)]

    def labels_from_codes(self, codes: Tensor, image_mask: Tensor) -> Tensor:
        """The offline path: precomputed ``codes [B, P]`` -> labels ``[M]``."""
        mask = self._check_mask(image_mask, codes.shape[0])
        return codes.long()[mask.to(codes.device)]

    def for_batch(self, image_batch: dict[str, Tensor]) -> Tensor:
        """Labels of one loader batch (``codes`` when precomputed, else ``tokenizer_images``; uint8
        ``crops`` of ``augment_on: device`` are rendered first)."""
        if "crops" in image_batch:
            image_batch = finish_views(dict(image_batch))
        if "codes" in image_batch:
            return self.labels_from_codes(image_batch["codes"], image_batch["image_mask"])
        return self(image_batch["tokenizer_images"], image_batch["image_mask"])


# ---------------------------------------------------------------------------------------------
# Offline precompute
# ---------------------------------------------------------------------------------------------
def _encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def precompute_codes(tokenizer: VQKD, shard_specs: Sequence[str], out_dir: str, views: int = 1,
                     fixed: bool = False, seed: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0),
                     crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5,
                     interpolation: str = "bicubic", batch_size: int = 64, source: str = "image",
                     device: str | torch.device = "cpu", progress: bool = True) -> dict[str, Any]:
    """Write a copy of the shards with ``codes.npy`` / ``crops.json`` added; returns the summary.

    ``fixed``: one view, the whole image (the loader then renders exactly that view); else
    ``views`` RandomResizedCrop+flip views per sample, drawn from ``(seed, shard, offset)``.
    Samples whose image cannot be decoded are copied unchanged (the loader skips them as
    ``missing_codes``) and counted.
    """
    import webdataset as wds

    from beit3.data_pipeline.samples import SkipSample, decode_image
    from beit3.data_pipeline.shards import TarIndex, resolve_shards, write_manifest
    from beit3.data_pipeline.transforms import CropParams, apply_crop, sample_crop

    cfg = tokenizer.config
    if cfg.num_codes > np.iinfo(np.int16).max + 1:
        raise ValueError(f"num_codes={cfg.num_codes} does not fit the int16 codes format")
    if fixed:
        views = 1
    if views < 1:
        raise ValueError(f"views={views}: must be >= 1")
    shards = resolve_shards(shard_specs, "--shards")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    in_place = {str(Path(p).resolve().parent) for p in shards.paths} & {str(out.resolve())}
    if in_place:
        raise ValueError(f"--out {out} is the input folder; write the coded shards elsewhere")
    targets = VisualTokenTargets(tokenizer.to(device))
    size = cfg.img_size
    stats: Counter = Counter()
    entries = []
    t0 = time.perf_counter()
    bar = tqdm(total=shards.total, desc="codes", unit="img", disable=not progress)
    names_seen: set[str] = set()
    for si, path in enumerate(shards.paths):
        name = Path(path).name
        if name in names_seen:
            name = f"{si:06d}-{name}"
        names_seen.add(name)
        index = TarIndex(path)
        writer = wds.TarWriter(str(out / name))
        count = 0
        for start in range(0, len(index), batch_size):
            chunk = [index[k] for k in range(start, min(start + batch_size, len(index)))]
            views_px: list[Tensor] = []
            owners: list[tuple[int, list[CropParams]]] = []
            for off, raw in enumerate(chunk):
                try:
                    img = decode_image(raw)
                except SkipSample as e:
                    stats[e.reason] += 1
                    continue
                if fixed:
                    crops = [CropParams(0, 0, img.height, img.width, False)]
                else:
                    rng = np.random.default_rng([seed, si, start + off])
                    crops = [sample_crop(img, rng, crop_scale, crop_ratio, flip_prob) for _ in range(views)]
                views_px.extend(apply_crop(img, c, size, interpolation) for c in crops)
                owners.append((off, crops))
            codes = targets.codes(torch.stack(views_px)).cpu().numpy().astype(np.int16) if views_px else None
            by_off = {}
            row = 0
            for off, crops in owners:
                by_off[off] = (codes[row:row + len(crops)], crops)
                row += len(crops)
            for off, raw in enumerate(chunk):
                sample = {k: v for k, v in raw.items() if k not in ("__url__", "codes.npy", "crops.json")}
                if off in by_off:
                    c, crops = by_off[off]
                    sample["codes.npy"] = _encode_npy(np.ascontiguousarray(c))
                    sample["crops.json"] = json.dumps([p.to_dict() for p in crops]).encode()
                    stats["coded"] += 1
                writer.write(sample)
                count += 1
            bar.update(len(chunk))
        writer.close()
        index.close()
        entries.append({"path": name, "count": count})
    bar.close()
    elapsed = time.perf_counter() - t0
    meta = {"codes": {"views": views, "fixed": fixed, "img_size": size, "patch_size": cfg.patch_size,
                      "num_codes": cfg.num_codes, "interpolation": interpolation, "seed": seed,
                      "crop_scale": list(crop_scale), "crop_ratio": list(crop_ratio), "flip_prob": flip_prob},
            "stats": dict(stats)}
    manifest = write_manifest(out / "manifest.json", source, entries, meta)
    summary = {"manifest": str(manifest), "samples": sum(e["count"] for e in entries), "seconds": elapsed,
               **dict(stats)}
    logger.info("precomputed codes: %s", summary)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m beit3.pretrain.targets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="tokenizer file (ours or a released BEiT v2 VQ-KD file)")
    p.add_argument("--shards", required=True, nargs="+", help="input shards: manifest.json, brace pattern or glob")
    p.add_argument("--out", required=True, help="output folder (new shards + manifest.json)")
    p.add_argument("--source", default="image", choices=("image", "pair"), help="manifest source name")
    p.add_argument("--views", type=int, default=1, help="augmented views per sample (K, default 1)")
    p.add_argument("--fixed", action="store_true", help="one fixed view: the whole image, no flip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0))
    p.add_argument("--crop-ratio", type=float, nargs=2, default=(3 / 4, 4 / 3))
    p.add_argument("--flip-prob", type=float, default=0.5)
    p.add_argument("--interpolation", default="bicubic", choices=("bicubic", "bilinear"))
    p.add_argument("--batch-size", type=int, default=64, help="views per tokenizer forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tok = load_tokenizer(args.tokenizer)
    summary = precompute_codes(tok, args.shards, args.out, views=args.views, fixed=args.fixed, seed=args.seed,
                               crop_scale=tuple(args.crop_scale), crop_ratio=tuple(args.crop_ratio),
                               flip_prob=args.flip_prob, interpolation=args.interpolation,
                               batch_size=args.batch_size, source=args.source, device=args.device,
                               progress=not args.quiet)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["VisualTokenTargets", "precompute_codes", "main"]
