"""Data pipeline benchmark: samples/s per CPU core per source, against a plain webdataset +
torchvision pipeline doing the same decode and crop in the same run, and the block-mask
generator against the straightforward loop.

    .venv/bin/python bench/data_pipeline.py [--images 384] [--repeat 3] [--out DIR]

Everything runs in this process on one thread and is timed in process CPU time
(``time.process_time``), so the per-core figures hold on a shared, loaded machine; a node scales
them by its worker count. Images: a size mix like img2dataset output (JPEGs with long side
256-1024 px cut from scikit-learn's two bundled photographs), also split into < 768 and >= 768 px;
text: standard-library docstrings; pairs: the same JPEGs with captions. Also: host-to-device bytes
per image for ``augment_on: cpu`` and ``device``. Prints markdown tables.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from beit3.data_pipeline import (DataConfig, PretrainLoader, BlockMaskGenerator, block_mask_reference,
                                 write_texts, train_spm)
from beit3.data_pipeline.augment import finish_views, h2d_bytes_per_image
from beit3.runtime.engine import select_device
from beit3.demo.digits import caption, photo_jpegs, write_corpus
from beit3.data_pipeline.sequence import sample_rng
from beit3.data_pipeline.shards import ShardWriter


REPO = Path(__file__).resolve().parent.parent
SMALL, LARGE = (256, 384, 512, 640), (768, 896, 1024)  # long side of the generated JPEGs


def build(root: Path, n_images: int) -> dict[str, str]:
    """Image shards of the whole size mix and of its small / large halves, pairs, texts, spm."""
    jpegs = photo_jpegs(n_images, sizes=SMALL + LARGE)
    labels = np.arange(n_images) % 10
    sets = {"img": range(n_images), "img_small": [k for k in range(n_images) if (SMALL + LARGE)[k % 7] in SMALL],
            "img_large": [k for k in range(n_images) if (SMALL + LARGE)[k % 7] in LARGE]}
    for name, ks in sets.items():
        with ShardWriter(root / name, "images", "image", maxcount=128) as w:
            for k in ks:
                w.write({"__key__": f"{k:06d}", "jpg": jpegs[k], "cls": int(labels[k])})
    with ShardWriter(root / "pair", "pairs", "pair", maxcount=128) as w:
        for k, (b, y) in enumerate(zip(jpegs, labels)):
            w.write({"__key__": f"{k:06d}", "jpg": b, "txt": caption(int(y), k)})
    corpus = write_corpus(root / "corpus.txt", 120)
    train_spm.main([str(corpus), "--out-prefix", str(root / "spm"), "--vocab-size", "2000"])
    write_texts.main([str(corpus), str(root / "txt"), "--spm", str(root / "spm.model"), "-q", "--maxcount", "500"])
    out = {k: str(root / k) for k in (*sets, "pair", "txt")}
    out.update(spm=str(root / "spm.model"), mean_jpeg_kb=f"{np.mean([len(b) for b in jpegs]) / 1024:.0f}")
    return out


def shard_urls(folder: str) -> list[str]:
    man = json.loads((Path(folder) / "manifest.json").read_text())
    return [str(Path(folder) / s["path"]) for s in man["shards"]]


def rate(make_iter: Callable[[], Iterable], n: int, repeat: int) -> float:
    """Best-of-``repeat`` samples per CPU-second over ``n`` samples (``make_iter`` yields batches or samples)."""
    best = 0.0
    for _ in range(repeat):
        it = iter(make_iter())
        got = 0
        t0 = time.process_time()
        while got < n:
            item = next(it)
            got += item if isinstance(item, int) else 1
        best = max(best, got / (time.process_time() - t0))
    return best


# ---- baselines: plain webdataset + torchvision ----------------------------------------------
def wds_image_baseline(urls: list[str], two_views: bool, jitter_norm: bool = True):
    import webdataset as wds
    from torchvision import transforms as T
    crop = T.RandomResizedCrop(224, interpolation=T.InterpolationMode.BICUBIC)
    flip = T.RandomHorizontalFlip()
    jitter = T.ColorJitter(0.4, 0.4, 0.4)
    to_t, norm = T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)

    def tf(img):
        v = flip(crop(img))
        tok = to_t(v) if two_views else None
        return (norm(to_t(jitter(v))) if jitter_norm else to_t(v)), tok

    return (wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat()
            .decode("pil").to_tuple("jpg", "cls").map_tuple(tf, int))


def wds_text_baseline(urls: list[str], max_len: int = 128):
    import webdataset as wds

    def tf(tokens):
        ids = torch.full((max_len,), 1, dtype=torch.long)
        body = torch.as_tensor(tokens[: max_len - 2], dtype=torch.long)
        ids[0], ids[1:len(body) + 1], ids[len(body) + 1] = 0, body, 2
        m = torch.rand(max_len) < 0.15
        return ids.masked_fill(m, 2001), m

    return wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat().decode().to_tuple("tokens.npy").map_tuple(tf)


def wds_pair_baseline(urls: list[str], spm: str):
    import webdataset as wds
    from beit3.data_pipeline import TextTokenizer
    tok = TextTokenizer(spm)
    from torchvision import transforms as T
    crop = T.RandomResizedCrop(224, interpolation=T.InterpolationMode.BICUBIC)
    flip, jitter = T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4)
    to_t, norm = T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)

    def tf(sample):
        img, txt = sample
        v = flip(crop(img))
        ids = tok.encode_with_specials(txt, 64)
        return norm(to_t(jitter(v))), to_t(v), torch.tensor(ids)

    return wds.WebDataset(urls, shardshuffle=False, empty_check=False).repeat().decode("pil").to_tuple("jpg", "txt").map(tf)


# ---- ours --------------------------------------------------------------------------------------
def _data_config(paths: dict[str, str], image_set: str = "img", **fields) -> DataConfig:
    """The generated shards as a ``DataConfig`` (``image_set``: which image shards), with ``fields`` set."""
    return DataConfig(image_shards=[paths[image_set] + "/manifest.json"], text_shards=[paths["txt"] + "/manifest.json"],
                      pair_shards=[paths["pair"] + "/manifest.json"], spm_path=paths["spm"], **fields)


def _loader(paths: dict[str, str], source: str, batch: int, augment_on: str, images: str = "img") -> PretrainLoader:
    counts = {"images": 0, "texts": 0, "pairs": 0}
    counts[{"image": "images", "text": "texts", "pair": "pairs"}[source]] = batch
    return PretrainLoader(_data_config(paths, images, num_workers=0, augment_on=augment_on, **counts), 0, 1, 1)


def ours(paths: dict[str, str], source: str, batch: int, augment_on: str = "device", images: str = "img"):
    """The loader's work per core (with ``augment_on: device`` the views are rendered in the step, not here)."""
    loader = _loader(paths, source, batch, augment_on, images)

    def gen():
        for b in loader:
            yield b[source]["sample_ids"].numel()
    return gen


@contextlib.contextmanager
def full_decode():
    """Ablation: the loader without the reduced-DCT decode (every JPEG decoded at full size)."""
    from beit3.data_pipeline import samples
    saved = samples.open_reduced
    samples.open_reduced = lambda img, p, size: 1.0
    try:
        yield
    finally:
        samples.open_reduced = saved


def h2d_bytes(paths: dict[str, str], augment_on: str) -> float:
    """Bytes per image of the image source's micro-batch that the step copies to the device."""
    return h2d_bytes_per_image(next(iter(_loader(paths, "image", 32, augment_on)))["image"])


def finish_cost(paths: dict[str, str], reps: int = 5) -> float:
    """CPU-seconds per image of ``finish_views`` on a micro-batch of 32 (one thread; the step's work
    on the training device, here run on the CPU for scale)."""
    b = next(iter(_loader(paths, "image", 32, "device")))["image"]
    t0 = time.process_time()
    for _ in range(reps):
        finish_views(dict(b))
    return (time.process_time() - t0) / (reps * 32)


def bench_masks(n: int, batch: int = 256) -> tuple[float, float, float, float]:
    gen = BlockMaskGenerator(14, 78, 16)
    gen.batch([np.random.default_rng(0)])  # build the packed rectangle table once
    rngs = [np.random.default_rng(s) for s in range(n)]
    t0 = time.process_time()
    for r in rngs:
        gen(r)
    fast = (time.process_time() - t0) / n
    rngs = [np.random.default_rng(s) for s in range(n)]
    t0 = time.process_time()
    for k in range(0, n, batch):
        gen.batch(rngs[k:k + batch])
    batched = (time.process_time() - t0) / n
    rngs = [np.random.default_rng(s) for s in range(n)]
    t0 = time.process_time()
    for r in rngs:
        block_mask_reference(14, 78, r, 16)
    loop = (time.process_time() - t0) / n
    t0 = time.process_time()
    for s in range(n):
        sample_rng(0, "image", s)
    rng_cost = (time.process_time() - t0) / n
    return loop, fast, batched, rng_cost


def mask_stats(n: int) -> str:
    """Count exactness and block structure of ``n`` loader masks (14x14, target 78, blocks >= 16)."""
    from scipy import ndimage

    masks = BlockMaskGenerator(14, 78, 16).batch([sample_rng(0, "image", s) for s in range(n)])
    exact = int((masks.sum(1) == 78).sum())
    in_big = []
    for m in masks:
        lab, k = ndimage.label(m.reshape(14, 14))
        sizes = np.bincount(lab.ravel())[1:]
        in_big.append(sizes[sizes >= 16].sum() / 78)
    freq = masks.mean(0)
    return (f"{n} masks: exactly 78 of 196 patches in {exact}/{n}; masked cells inside 4-connected regions "
            f">= 16 cells: {100 * np.mean(in_big):.1f}% on average; per-position mask frequency "
            f"{freq.min():.2f}..{freq.max():.2f} (mean {freq.mean():.3f})")


PEAK_TFLOPS, RANKS = 989.0, 8  # an H100/H200's dense bf16 peak; ranks of one node


def recipe_need(name: str) -> tuple[Any, dict[str, float]]:
    """A pretraining recipe's config and the samples/s per source one of ``RANKS`` ranks needs at the
    feed MFU of ``PEAK_TFLOPS`` (``pretrain/feed.py``)."""
    from beit3.model.config_io import load_config
    from beit3.pretrain.feed import need_per_rank
    from beit3.pretrain.train import TrainConfig

    cfg = load_config(TrainConfig, str(REPO / "pretrain" / "configs" / f"{name}.yaml"), [])
    return cfg, need_per_rank(cfg.model.build_config(), cfg.data, RANKS, PEAK_TFLOPS)


def feed_table(rates: dict[str, float], where: str) -> str:
    """Workers per rank the recipes need at 30% MFU of an H100/H200 (989 dense bf16 TFLOP/s) on
    8 ranks (pretrain/feed.py), at ``rates`` samples/s/core; the recipe's ``data.num_workers`` beside."""
    from beit3.pretrain.feed import FEED_MFU, workers_needed

    lines = [f"Feed rate at {FEED_MFU:.0%} MFU of {PEAK_TFLOPS:.0f} TFLOP/s (H100/H200 bf16), {RANKS} ranks, "
             f"per-core rates {where}: "
             + ", ".join(f"{s} {v:.0f}/s" for s, v in rates.items()), "",
             "| recipe | samples/s per rank (each source) | loader workers needed per rank | recipe's data.num_workers |",
             "|---|---:|---:|---:|"]
    for name in ("base", "giant"):
        cfg, need = recipe_need(name)
        lines.append(f"| {name} | {max(need.values()):.0f} | {workers_needed(need, rates):.2f} | {cfg.data.num_workers} |")
    return "\n".join(lines)


def fed_rate(paths: dict[str, str], workers: int, batch: int, batches: int, device: torch.device) -> float:
    """Wall-clock samples/s the whole loader delivers into the step: the three sources at ``batch`` each per
    micro-batch, ``augment_on: device``, ``workers`` worker processes (pinned memory on CUDA), every source
    copied to ``device`` and its views finished there (``pretrain.objective.device_source``, as the step
    does). Timed after the workers' first prefetched round, so start-up and the prefetch buffer are excluded."""
    from beit3.pretrain.objective import device_source

    cfg = _data_config(paths, num_workers=workers, augment_on="device", pin_memory=device.type == "cuda",
                       images=batch, texts=batch, pairs=batch)
    loader = PretrainLoader(cfg, 0, 1, 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        it = iter(loader)
        for _ in range(workers * cfg.prefetch_factor + 1):
            next(it)
        t0, got = time.perf_counter(), 0
        for _ in range(batches):
            b = next(it)
            for src in ("image", "text", "pair"):
                device_source(b[src], device, dtype)
                got += b[src]["sample_ids"].numel()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return got / (time.perf_counter() - t0)
    finally:
        loader.close()


def workers_table(paths: dict[str, str], workers: list[int], batch: int, batches: int) -> str:
    """``fed_rate`` per worker count, against what a base rank needs (``recipe_need``), all sources together."""
    from beit3.pretrain.feed import FEED_MFU

    need = sum(recipe_need("base")[1].values())
    device = select_device()[1]  # BEIT3_DEVICE / auto, as training chooses
    lines = [f"Whole loader into the step on {device.type} ({os.cpu_count()} cores here): images + texts + pairs, "
             f"{batch} each per micro-batch, augment_on device (views finished on {device.type}), "
             f"{batches} micro-batches timed after the prefetch round; need = base recipe at {FEED_MFU:.0%} MFU of "
             f"{PEAK_TFLOPS:.0f} TFLOP/s, {RANKS} ranks, all sources", "",
             "| workers | samples/s (wall) | per worker | need per rank | delivered / need |",
             "|---:|---:|---:|---:|---:|"]
    for w in workers:
        r = fed_rate(paths, w, batch, batches, device)
        lines.append(f"| {w} | {r:.0f} | {r / w:.0f} | {need:.0f} | {r / need:.2f} |")
    return "\n".join(lines)


def print_tables(paths: dict, rows: list[tuple], images: int, n: int, r: int) -> None:
    """The loader, host-to-device, finish and block-mask tables."""
    bytes_cpu, bytes_dev = h2d_bytes(paths, "cpu"), h2d_bytes(paths, "device")
    fin = finish_cost(paths)

    loop, fast, batched, rng_cost = bench_masks(4096)
    print(f"\nJPEGs: photographs (scikit-learn's china/flower) cropped and resized to long side "
          f"{SMALL + LARGE} px in turn, quality 95, mean {paths['mean_jpeg_kb']} KiB; {images} images; "
          f"{n} samples per measurement, best of {r}, 1 thread, process CPU time; torch {torch.__version__}, "
          f"python {sys.version.split()[0]}\n")
    print("ours = PretrainLoader, one source enabled, micro-batches of 32 (text 128): random access by global "
          "position, decode (reduced DCT when the crop is >= 2x the output), crop + resize to uint8, block masks, "
          "text masking, collate; `augment_on: cpu` also flip, jitter, normalize and the tokenizer view in the "
          "worker, `device` leaves them to the training step. ours / baseline > 1: ours is faster.\n")
    print("| source | baseline (same process) | augment_on | baseline samples/s/core | ours samples/s/core "
          "| ours / baseline |")
    print("|---|---|---|---:|---:|---:|")
    for src, what, where, b, o in rows:
        print(f"| {src} | {what} | {where} | {b:.0f} | {o:.0f} | {o / b:.2f} |")
    print("\n| host-to-device bytes per image (image source, 224 px, mask included) | bytes | vs cpu |")
    print("|---|---:|---:|")
    print(f"| augment_on: cpu (float32 model view + float32 tokenizer view) | {bytes_cpu:.0f} | 1 |")
    print(f"| augment_on: device (uint8 crop + flip + jitter factors and order) | {bytes_dev:.0f} "
          f"| 1/{bytes_cpu / bytes_dev:.2f} |")
    print(f"\nfinish_views (flip, jitter, normalize, tokenizer view) run on this CPU, one thread: "
          f"{fin * 1e6:.0f} us per image ({1 / fin:.0f} images/s/core) -- with `augment_on: device` this is the "
          f"training device's work, not the loader's")
    print("\n| block mask 14x14, 78 patches | us per mask |")
    print("|---|---:|")
    print(f"| straightforward loop (numpy array, BEiT's algorithm) | {loop * 1e6:.1f} |")
    print(f"| BlockMaskGenerator, one mask (int bitmask + popcount) | {fast * 1e6:.1f} ({loop / fast:.1f}x) |")
    print(f"| BlockMaskGenerator.batch, 256 masks (vectorized over images; loader path) "
          f"| {batched * 1e6:.1f} ({loop / batched:.1f}x) |")
    print(f"| per-sample generator creation (sample_rng) | {rng_cost * 1e6:.1f} |")
    print("\n" + mask_stats(4096))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=448, help="images (and pairs) in the generated shards")
    p.add_argument("--samples", type=int, default=256, help="samples timed per measurement")
    p.add_argument("--repeat", type=int, default=3, help="best of N")
    p.add_argument("--out", type=Path, default=None, help="keep the generated shards here")
    p.add_argument("--feed-only", action="store_true", help="only the feed table, at the committed rates")
    p.add_argument("--workers", type=int, nargs="+", default=None, metavar="N",
                   help="also the whole loader with N worker processes into the step (e.g. 4 8 12; wall clock)")
    p.add_argument("--workers-batch", type=int, default=32, help="--workers: samples per source per micro-batch")
    p.add_argument("--workers-batches", type=int, default=24, help="--workers: micro-batches timed")
    args = p.parse_args(argv)
    if args.feed_only:
        from beit3.pretrain.feed import RATES_FILE, loader_rates

        print(feed_table(loader_rates(), f"of {RATES_FILE.relative_to(REPO)}"))
        return 0
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(tmp.name) if tmp else args.out
    paths = build(root, args.images)
    n, r = args.samples, args.repeat
    pair_urls, txt_urls = shard_urls(paths["pair"]), shard_urls(paths["txt"])

    rows = []
    for images, what in (("img", "all sizes 256-1024"), ("img_small", "256-640 px"), ("img_large", ">= 768 px")):
        urls = shard_urls(paths[images])
        base0 = rate(lambda: wds_image_baseline(urls, two_views=False, jitter_norm=False), n, r)
        dev = rate(ours(paths, "image", 32, "device", images), n, r)
        rows.append(("image", f"{what}: wds+torchvision decode, RRC 224, flip, to-tensor", "device", base0, dev))
        with full_decode():
            full = rate(ours(paths, "image", 32, "device", images), n, r)
        rows.append(("image", f"{what}: same baseline; ours with full-size decode (ablation)", "device", base0, full))
        if images == "img":
            base2 = rate(lambda: wds_image_baseline(urls, two_views=True), n, r)
            cpu = rate(ours(paths, "image", 32, "cpu", images), n, r)
            rows.append(("image", f"{what}: same + jitter, normalize, tokenizer view", "cpu", base2, cpu))
            rows.append(("image", f"{what}: same + jitter, normalize, tokenizer view", "device", base2, dev))
    base_p = rate(lambda: wds_pair_baseline(pair_urls, paths["spm"]), n, r)
    our_pair = rate(ours(paths, "pair", 32), n, r)
    rows.append(("pair", "wds+torchvision: image as above (2 views) + spm encode", "device", base_p, our_pair))
    base_t = rate(lambda: wds_text_baseline(txt_urls), 4 * n, r)
    our_txt = rate(ours(paths, "text", 128), 4 * n, r)
    rows.append(("text", "wds: tokens.npy decode, pad 128, Bernoulli 15% mask", "-", base_t, our_txt))
    print_tables(paths, rows, args.images, n, r)
    measured = {"image": rows[0][4], "pair": our_pair, "text": our_txt}  # the augment_on: device rows
    print("\n" + feed_table(measured, "measured above (ours, augment_on: device)"))
    if args.workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - max(args.workers)))
        print("\n" + workers_table(paths, args.workers, args.workers_batch, args.workers_batches))
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
