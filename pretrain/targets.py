"""Visual-token targets for masked image modeling: online (frozen tokenizer in the step) and
offline (codes precomputed into the shards).

Online::

    targets = VisualTokenTargets.from_checkpoint("tokenizer.pt", device="cuda")
    labels = targets(batch["tokenizer_images"], batch["image_mask"])   # LongTensor [M]

Offline: ``python -m beit3.pretrain.targets --tokenizer tokenizer.pt --shards in/manifest.json
--out out/ --views 4`` writes new shards that copy every field and add ``codes.npy`` (int16
``[K, P]``) and ``crops.json`` (K views ``{"i", "j", "h", "w", "flip"}`` in original-image
pixels); with ``data.offline_codes: true`` the loader picks one view per sample and yields
``codes [B, P]``; ``labels_from_codes`` then replaces the tokenizer forward. ``--workers N``
decode processes per rank; as a distributed job (``deepspeed --num_gpus N --module
beit3.pretrain.targets ...`` or torchrun) each rank codes every N-th shard, rank 0 writes the one
manifest when all are done; a rerun skips the shards already coded (``{shard}.done`` markers).
Output bytes do not depend on the number of workers or ranks.
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
from beit3.model.vqkd import VQKD, default_codes_dtype, freeze, load_tokenizer
from beit3.runtime.engine import select_device

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


def _decode_views(job: tuple[dict, int, int], views: int, fixed: bool, seed: int, crop_scale: tuple, crop_ratio: tuple,
                  flip_prob: float, size: int, interpolation: str) -> tuple[Any, Any]:
    """(uint8 [H, W, 3] views, their crops) of one sample, or (None, skip reason); runs in decode workers.
    The views are ``apply_crop``'s pixels; the crops are drawn from ``(seed, shard, offset)``."""
    from beit3.data_pipeline.samples import SkipSample, decode_image
    from beit3.data_pipeline.transforms import CropParams, crop_pil, sample_crop

    raw, si, off = job
    try:
        img = decode_image(raw)
    except SkipSample as e:
        return None, e.reason
    if fixed:
        crops = [CropParams(0, 0, img.height, img.width, False)]
    else:
        rng = np.random.default_rng([seed, si, off])
        crops = [sample_crop(img, rng, crop_scale, crop_ratio, flip_prob) for _ in range(views)]
    return [np.array(crop_pil(img, c, size, interpolation), dtype=np.uint8) for c in crops], crops


def _jobs(todo: list[tuple[int, str, str]]):
    """Image fields of every sample of the shards to code, in order (what the decode workers need)."""
    from beit3.data_pipeline.samples import IMAGE_EXTS
    from beit3.data_pipeline.shards import TarIndex

    for si, _, path in todo:
        index = TarIndex(path)
        for off in range(len(index)):
            raw = index[off]
            yield {k: v for k, v in raw.items() if k in IMAGE_EXTS or k == "__key__"}, si, off
        index.close()


def _code_shard(targets: VisualTokenTargets, path: str, out: Path, decoded, batch_size: int) -> dict[str, Any]:
    """Copy one shard with codes added (``decoded`` yields its samples' views in order); written
    to a temporary name and renamed, then marked done with ``{name}.done``. Returns the marker."""
    import webdataset as wds

    from beit3.data_pipeline.shards import TarIndex

    index, stats, count = TarIndex(path), Counter(), 0
    tmp = out.with_name(out.name + ".tmp")
    writer = wds.TarWriter(str(tmp), mtime=0.0)
    for start in range(0, len(index), batch_size):
        chunk = [index[k] for k in range(start, min(start + batch_size, len(index)))]
        views = [next(decoded) for _ in chunk]
        px = [torch.from_numpy(v).permute(2, 0, 1) for vs, _ in views if vs is not None for v in vs]
        codes = targets.codes(torch.stack(px).float().div_(255.0)).cpu().numpy().astype(np.int16) if px else None
        row = 0
        for raw, (vs, crops) in zip(chunk, views):
            sample = {k: v for k, v in raw.items() if k not in ("__url__", "codes.npy", "crops.json")}
            if vs is None:
                stats[crops] += 1  # the skip reason; the sample is copied without codes
            else:
                sample["codes.npy"] = _encode_npy(np.ascontiguousarray(codes[row:row + len(vs)]))
                sample["crops.json"] = json.dumps([p.to_dict() for p in crops]).encode()
                row += len(vs)
                stats["coded"] += 1
            writer.write(sample)
            count += 1
    writer.close()
    index.close()
    os.replace(tmp, out)
    return {"path": out.name, "count": count, "stats": dict(stats)}


def _plan(paths: Sequence[str]) -> list[tuple[int, str, str]]:
    """(shard index, output name, input path) of every input shard; clashing names get the index."""
    plan, seen = [], set()
    for si, path in enumerate(paths):
        name = Path(path).name
        if name in seen:
            name = f"{si:06d}-{name}"
        seen.add(name)
        plan.append((si, name, path))
    return plan


def _finished(out: Path, name: str, options: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The done marker of a shard coded with the same options, or None (to code); other options raise."""
    marker = out / f"{name}.done"
    if not marker.is_file() or not (out / name).is_file():
        return None
    done = json.loads(marker.read_text())
    if done.get("options") != options:
        raise ValueError(f"--out {out} holds {name} coded with {done.get('options')}, not {options}; "
                         f"use another --out (or delete it) to code with new options")
    return done


def _write_manifest_when_complete(out: Path, plan: list, options: dict, meta: dict, source: str,
                                  poll_s: float = 2.0) -> Path:
    """Wait until every shard of ``plan`` is marked done (other ranks code theirs), then write the manifest."""
    from beit3.data_pipeline.shards import write_manifest

    waited = 0.0
    while True:
        done = [_finished(out, name, options) for _, name, _ in plan]
        if all(done):
            break
        if waited % 60 < poll_s:
            logger.info("waiting for %d shard(s) coded by other ranks", sum(d is None for d in done))
        time.sleep(poll_s)
        waited += poll_s
    stats: Counter = Counter()
    for d in done:
        stats.update(d["stats"])
    entries = [{"path": d["path"], "count": d["count"]} for d in done]
    return write_manifest(out / "manifest.json", source, entries, {**meta, "stats": dict(stats)})


def precompute_codes(tokenizer: VQKD, shard_specs: Sequence[str], out_dir: str, views: int = 1,
                     fixed: bool = False, seed: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0),
                     crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5,
                     interpolation: str = "bicubic", batch_size: int = 64, source: str = "image",
                     device: str | torch.device = "cpu", progress: bool = True, workers: int = 1,
                     rank: int = 0, world_size: int = 1) -> dict[str, Any]:
    """Write a copy of the shards with ``codes.npy`` / ``crops.json`` added; returns the summary.

    ``fixed``: one view, the whole image (the loader then renders exactly that view); else
    ``views`` RandomResizedCrop+flip views per sample, drawn from ``(seed, shard, offset)``.
    Samples whose image cannot be decoded are copied unchanged (the loader skips them as
    ``missing_codes``) and counted. ``workers`` processes decode and crop (the tokenizer runs
    here); rank ``r`` of ``world_size`` codes shards ``r, r + world_size, ...``; shards already
    coded with the same options are skipped (resume); rank 0 writes the manifest when all are done.
    Output bytes do not depend on workers, ranks or resumes.
    """
    from functools import partial

    from beit3.data_pipeline.shards import resolve_shards
    from beit3.data_pipeline.writing import ordered_map, worker_pool

    cfg = tokenizer.config
    if cfg.num_codes > np.iinfo(np.int16).max + 1:
        raise ValueError(f"num_codes={cfg.num_codes} does not fit the int16 codes format")
    if fixed:
        views = 1
    if views < 1:
        raise ValueError(f"views={views}: must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    shards = resolve_shards(shard_specs, "--shards")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    in_place = {str(Path(p).resolve().parent) for p in shards.paths} & {str(out.resolve())}
    if in_place:
        raise ValueError(f"--out {out} is the input folder; write the coded shards elsewhere")
    options = json.loads(json.dumps({"views": views, "fixed": fixed, "seed": seed, "crop_scale": list(crop_scale),
                                     "crop_ratio": list(crop_ratio), "flip_prob": flip_prob,
                                     "interpolation": interpolation, "img_size": cfg.img_size,
                                     "dtype": str(default_codes_dtype(torch.device(device))).replace("torch.", ""),
                                     "device": torch.device(device).type}))
    plan = _plan(shards.paths)
    mine = [x for x in plan if x[0] % world_size == rank]
    todo = [x for x in mine if _finished(out, x[1], options) is None]
    targets = VisualTokenTargets(tokenizer.to(device))
    decode = partial(_decode_views, views=views, fixed=fixed, seed=seed, crop_scale=tuple(crop_scale),
                     crop_ratio=tuple(crop_ratio), flip_prob=flip_prob, size=cfg.img_size, interpolation=interpolation)
    t0 = time.perf_counter()
    stats: Counter = Counter()
    samples = 0
    with worker_pool(workers) as pool:
        decoded = ordered_map(decode, _jobs(todo), pool, chunksize=8)
        for _, name, path in tqdm(todo, desc=f"rank {rank} shards", unit="shard", disable=not progress):
            done = _code_shard(targets, path, out / name, decoded, batch_size)
            (out / f"{name}.done").write_text(json.dumps({**done, "options": options}))
            stats.update(done["stats"])
            samples += done["count"]
    elapsed = time.perf_counter() - t0
    summary = {"rank": rank, "shards": len(todo), "resumed_shards": len(mine) - len(todo), "samples": samples,
               "seconds": elapsed, **dict(stats)}
    if rank == 0:
        meta = {"codes": {**options, "patch_size": cfg.patch_size, "num_codes": cfg.num_codes}}
        summary["manifest"] = str(_write_manifest_when_complete(out, plan, options, meta, source))
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
    p.add_argument("--device", default=None,
                   help="cuda: this rank's GPU (LOCAL_RANK) under a launcher; cpu; or a torch device "
                        "(default: the trainers' choice, runtime.engine.select_device: BEIT3_DEVICE, else auto)")
    p.add_argument("--workers", type=int, default=1, help="decode processes per rank (default 1)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("-q", "--quiet", action="store_true")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device is None:
        device = str(select_device()[1])
    else:
        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.device == "cuda" else args.device
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun / deepspeed
    torch.set_num_threads(max(1, torch.get_num_threads() // local))  # ranks of a node share its cores
    tok = load_tokenizer(args.tokenizer)
    summary = precompute_codes(tok, args.shards, args.out, views=args.views, fixed=args.fixed, seed=args.seed,
                               crop_scale=tuple(args.crop_scale), crop_ratio=tuple(args.crop_ratio),
                               flip_prob=args.flip_prob, interpolation=args.interpolation,
                               batch_size=args.batch_size, source=args.source, device=device,
                               progress=not args.quiet, workers=args.workers, rank=rank, world_size=world)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["VisualTokenTargets", "precompute_codes", "main"]
