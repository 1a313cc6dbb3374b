"""``python -m beit3.data_pipeline.write_manifest PATTERN... --source pair --out manifest.json``.

Counts the samples of existing shards (e.g. img2dataset output) once, so that loaders start
without a header scan. Paths in the manifest are relative to its folder when possible.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from tqdm import tqdm

from .shards import count_samples, expand_pattern, write_manifest
from .writing import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m beit3.data_pipeline.write_manifest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("patterns", nargs="+", help="brace patterns / globs of tar shards")
    p.add_argument("--source", choices=("image", "text", "pair"), required=True)
    p.add_argument("--out", type=Path, required=True, help="manifest path (.json)")
    args = p.parse_args(argv)
    setup_logging()
    paths = [x for pat in args.patterns for x in expand_pattern(pat)]
    if not paths:
        raise SystemExit(f"write_manifest: {args.patterns} match no shard")
    root = args.out.resolve().parent
    shards = []
    for path in tqdm(paths, desc="shards", unit="shard"):
        rel = os.path.relpath(Path(path).resolve(), root)
        shards.append({"path": rel if not rel.startswith("..") else str(Path(path).resolve()),
                       "count": count_samples(path)})
    out = write_manifest(args.out, args.source, shards, {"patterns": args.patterns})
    print(f"write_manifest: {len(shards)} shards, {sum(s['count'] for s in shards)} samples -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
