"""``python -m beit3.data_pipeline.write_images SRC OUT``: an ImageFolder tree -> image shards.

SRC/<class>/<image> (ImageNet layout). Each sample: the original image bytes (``jpg``/``png``/...),
``cls`` (class index, classes sorted by name) and ``json`` ({"path", "class"}). Files are shuffled
(``--seed``) so that every shard mixes classes. Unreadable images are skipped and reported.
``--workers N`` processes read, verify and write whole shards (same bytes for any N).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from .writing import IMAGE_SUFFIXES, add_shard_args, file_size, image_member, report, setup_logging, write_sharded


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


def image_sample(job: tuple[str, Path, int, str, str, bool]) -> dict | str:
    """One shard sample of an image file (in a writer process), or ``corrupt_image``."""
    key, path, ci, rel, name, verify = job
    try:
        ext, data = image_member(path, verify=verify)
    except (ValueError, OSError):
        return "corrupt_image"
    return {"__key__": key, ext: data, "cls": ci, "json": {"path": rel, "class": name}}


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
    items = (((f"{n:09d}", f, ci, str(f.relative_to(args.src)), classes[ci], not args.no_verify), file_size(f) + 128)
             for n, (f, ci) in enumerate(files))  # + cls, json: ShardWriter's 64 bytes each
    manifest, total, skipped = write_sharded(items, image_sample, args.out, args.prefix, "image", args,
                                             {"classes": classes, "src": str(args.src)})
    report("write_images", total, skipped, manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
