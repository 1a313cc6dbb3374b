"""``python -m beit3.data_pipeline.write_pairs SRC OUT``: image-text pairs -> pair shards.

SRC is a COCO-captions JSON (``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
"caption"}]}``; images under ``--image-root``, default SRC's folder) or a TSV of ``image_path<TAB>caption``
lines (relative paths are taken from the TSV's folder; a header line ``filepath<TAB>...`` is
skipped). One sample per caption: the original image bytes, ``txt`` (caption) and ``json``.
img2dataset output (``NNNN.jpg`` + ``.txt`` + ``.json`` tars) needs no rewrite: point
``data.pair_shards`` at the tars, optionally after ``write_manifest`` to count them once.
Missing / unreadable images and empty captions are skipped and reported. ``--workers N``
processes read, verify and write whole shards (same bytes for any N).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from .writing import add_shard_args, file_size, image_member, report, setup_logging, write_sharded

_TSV_HEADERS = {"filepath", "image", "image_path", "path", "file", "url"}


def coco_pairs(src: Path, image_root: Path) -> list[tuple[Path, str, dict]]:
    data = json.loads(src.read_text())
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        anns = data["annotations"]
    except (KeyError, TypeError) as e:
        raise SystemExit(f"write_pairs: {src} is not a COCO captions file (missing {e})") from None
    out = []
    for a in anns:
        fn = files.get(a.get("image_id"))
        meta = {"image_id": a.get("image_id"), "id": a.get("id")}
        out.append((image_root / fn if fn else Path(""), a.get("caption") or "", meta))
    return out


def tsv_pairs(src: Path) -> list[tuple[Path, str, dict]]:
    out = []
    with src.open(encoding="utf-8", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)):
            if not row or (n == 0 and row[0].strip().lower() in _TSV_HEADERS):
                continue
            path = Path(row[0].strip())
            caption = row[1] if len(row) > 1 else ""
            out.append((path if path.is_absolute() else src.parent / path, caption, {"line": n}))
    return out


def pair_sample(job: tuple[str, Path, str, dict, bool]) -> dict | str:
    """One shard sample of an image + caption (in a writer process), or ``missing_or_corrupt_image``."""
    key, path, caption, meta, verify = job
    try:
        ext, data = image_member(path, verify=verify)
    except (ValueError, OSError):
        return "missing_or_corrupt_image"
    return {"__key__": key, ext: data, "txt": caption, "json": {**meta, "path": str(path)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m beit3.data_pipeline.write_pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="COCO captions .json or .tsv")
    p.add_argument("out", type=Path, help="output folder for shards and manifest.json")
    p.add_argument("--format", choices=("auto", "coco", "tsv"), default="auto")
    p.add_argument("--image-root", type=Path, default=None, help="COCO image folder (default: SRC's folder)")
    p.add_argument("--no-verify", action="store_true", help="do not check that images open")
    add_shard_args(p, "pairs", 10000)
    args = p.parse_args(argv)
    setup_logging()
    if not args.src.is_file():
        raise SystemExit(f"write_pairs: {args.src} does not exist")
    fmt = args.format
    if fmt == "auto":
        fmt = {".json": "coco", ".tsv": "tsv"}.get(args.src.suffix.lower(), "")
        if not fmt:
            raise SystemExit(f"write_pairs: cannot tell the format of {args.src}; pass --format coco|tsv")
    pairs = (coco_pairs(args.src, args.image_root or args.src.parent) if fmt == "coco" else tsv_pairs(args.src))
    jobs, empty = [], 0
    for n, (path, caption, meta) in enumerate(pairs):
        caption = caption.strip() if isinstance(caption, str) else ""
        if not caption:  # skipped here: no image read, no slot in a shard
            empty += 1
            continue
        job = (f"{n:09d}", path, caption, meta, not args.no_verify)
        jobs.append((job, file_size(path) + len(caption) + 64))  # + json: ShardWriter's 64 bytes
    manifest, total, skipped = write_sharded(jobs, pair_sample, args.out, args.prefix, "pair", args,
                                             {"src": str(args.src), "format": fmt})
    if empty:
        skipped["empty_text"] += empty
    report("write_pairs", total, skipped, manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
