"""``python -m beit3.data_pipeline.write_images SRC OUT``: an ImageFolder tree -> image shards.

SRC/<class>/<image> (ImageNet layout). Each sample: the original image bytes (``jpg``/``png``/...),
``cls`` (class index, classes sorted by name) and ``json`` ({"path", "class"}). Files are shuffled
(``--seed``) so that every shard mixes classes. Unreadable images are skipped and reported.
"""
from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from .shards import ShardWriter
from .writing import IMAGE_SUFFIXES, add_shard_args, ordered_map, read_image_job, report, setup_logging, shard_mtime


def list_image_folder(src: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(sorted class names, [(file, class index)]) of an ImageFolder tree."""
    classes = sorted(d.name for d in src.iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"write_images: {src} has no class sub-folders (expected SRC/<class>/<image>)")
    files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((src / c).rglob("*"))
             if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise SystemExit(f"write_images: no image file under {src}")
    return classes, files


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m beit3.data_pipeline.write_images", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="ImageFolder root")
    p.add_argument("out", type=Path, help="output folder for shards and manifest.json")
    add_shard_args(p, "images", 10000)
    p.add_argument("--seed", type=int, default=0, help="file-order shuffle seed (default 0)")
    p.add_argument("--no-shuffle", action="store_true", help="keep the sorted order")
    p.add_argument("--no-verify", action="store_true", help="do not check that images open")
    args = p.parse_args(argv)
    setup_logging()
    if not args.src.is_dir():
        raise SystemExit(f"write_images: {args.src} is not a folder")
    classes, files = list_image_folder(args.src)
    if not args.no_shuffle:
        random.Random(args.seed).shuffle(files)
    skipped: Counter = Counter()
    members = ordered_map(read_image_job, ((f, not args.no_verify) for f, _ in files), args.workers)
    with ShardWriter(args.out, args.prefix, "image", args.maxcount, int(args.maxsize),
                     meta={"classes": classes, "src": str(args.src)}, mtime=shard_mtime()) as w:
        for n, ((f, ci), member) in enumerate(zip(tqdm(files, desc="images", unit="img", disable=args.quiet), members)):
            if member is None:
                skipped["corrupt_image"] += 1
                continue
            ext, data = member
            w.write({"__key__": f"{n:09d}", ext: data, "cls": ci,
                     "json": {"path": str(f.relative_to(args.src)), "class": classes[ci]}})
    report("write_images", w.total, skipped, args.out / "manifest.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
