"""``python -m beit3.data_pipeline.write_manifest PATTERN... --source pair --out manifest.json``.

Counts the samples of existing shards (e.g. img2dataset output) once, so that loaders start
without a header scan. Paths in the manifest are relative to its folder when possible. Remote
patterns (``s3://``, ``gs://``, ``http(s)://``, ``pipe:``) are downloaded once through the node
cache (``--cache-dir``, ``--cache-size-gb``) to be counted and listed by their full location.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from tqdm import tqdm

from .remote import expand_remote, is_remote
from .shard_cache import NodeShardCache, default_cache_dir
from .shards import count_samples, expand_pattern, write_manifest
from .writing import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m beit3.data_pipeline.write_manifest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("patterns", nargs="+", help="brace patterns / globs of tar shards")
    p.add_argument("--source", choices=("image", "text", "pair"), required=True)
    p.add_argument("--out", type=Path, required=True, help="manifest path (.json)")
    p.add_argument("--cache-dir", default="", help=f"node cache for remote shards (default {default_cache_dir()})")
    p.add_argument("--cache-size-gb", type=float, default=64.0)
    args = p.parse_args(argv)
    setup_logging()
    paths = [x for pat in args.patterns for x in (expand_remote(pat) if is_remote(pat) else expand_pattern(pat))]
    cache = NodeShardCache(args.cache_dir, int(args.cache_size_gb * (1 << 30))) if any(map(is_remote, paths)) else None
    if not paths:
        raise SystemExit(f"write_manifest: {args.patterns} match no shard")
    root = args.out.resolve().parent
    shards = []
    for path in tqdm(paths, desc="shards", unit="shard"):
        if is_remote(path):
            shards.append({"path": path, "count": count_samples(path, cache)})
            continue
        rel = os.path.relpath(Path(path).resolve(), root)
        shards.append({"path": rel if not rel.startswith("..") else str(Path(path).resolve()),
                       "count": count_samples(path)})
    out = write_manifest(args.out, args.source, shards, {"patterns": args.patterns})
    print(f"write_manifest: {len(shards)} shards, {sum(s['count'] for s in shards)} samples -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
