"""Helpers shared by the shard-writing command-line tools.

``--workers N``: the per-item work (reading and verifying images, tokenizing documents) runs in N
processes (``ordered_map``), results come back in input order and one process writes the shards,
so shard names, boundaries and bytes do not depend on N (tar member mtimes are fixed:
``SOURCE_DATE_EPOCH``, default 0). Throughput: min(N x per-worker rate, the writing process's rate).
"""
from __future__ import annotations

import argparse
import io
import itertools
import logging
import multiprocessing as mp
import os
from collections import Counter, deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

from PIL import Image

logger = logging.getLogger(__name__)

_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".ppm": "ppm",
        ".tif": "tif", ".tiff": "tif"}
IMAGE_SUFFIXES = tuple(_EXT)


def add_shard_args(p: argparse.ArgumentParser, prefix: str, maxcount: int) -> None:
    p.add_argument("--prefix", default=prefix, help=f"shard file prefix (default {prefix})")
    p.add_argument("--maxcount", type=int, default=maxcount, help=f"samples per shard (default {maxcount})")
    p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard (default 1e9)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=1, help="processes for the per-item work (default 1)")


def shard_mtime() -> float:
    """Tar member mtime of written shards: ``SOURCE_DATE_EPOCH`` (reproducible-builds convention) or 0."""
    return float(os.environ.get("SOURCE_DATE_EPOCH", 0))


def _run_chunk(fn: Callable[[Any], Any], chunk: list) -> list:
    return [fn(x) for x in chunk]


def ordered_map(fn: Callable[[Any], Any], items: Iterable, workers: int = 1,
                initializer: Optional[Callable[..., None]] = None, initargs: tuple = (),
                chunksize: int = 16) -> Iterator[Any]:
    """``map(fn, items)`` in input order, in this process (``workers == 1``) or in a pool of
    ``workers`` forked processes (``initializer(*initargs)`` once in each); at most
    ``2 * workers`` chunks of ``chunksize`` items are in flight, so ``items`` may be a long stream.
    ``fn`` must be a module-level function; its exceptions propagate."""
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if workers == 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    it = iter(items)
    with mp.get_context("fork").Pool(workers, initializer, initargs) as pool:
        pending: deque = deque()

        def submit() -> None:
            chunk = list(itertools.islice(it, chunksize))
            if chunk:
                pending.append(pool.apply_async(_run_chunk, (fn, chunk)))

        for _ in range(2 * workers):
            submit()
        while pending:
            done = pending.popleft().get()
            submit()
            yield from done


def image_member(path: Path, verify: bool = True) -> tuple[str, bytes]:
    """(webdataset extension, original file bytes); raises ``ValueError`` for an unusable image.
    The bytes are stored as they are (no re-encoding)."""
    ext = _EXT.get(path.suffix.lower())
    if ext is None:
        raise ValueError(f"{path}: not an image file suffix")
    data = path.read_bytes()
    if verify:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise ValueError(f"{path}: {e}") from None
    return ext, data


def read_image_job(job: tuple[Path, bool]) -> Optional[tuple[str, bytes]]:
    """``image_member(path, verify)`` for ``ordered_map``; None for an unusable image."""
    try:
        return image_member(*job)
    except (ValueError, OSError):
        return None


def report(tool: str, written: int, skipped: Counter, manifest: Path) -> None:
    msg = f"{tool}: wrote {written} samples; manifest {manifest}"
    if skipped:
        msg += f"; skipped {sum(skipped.values())} ({dict(skipped)})"
    print(msg)


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
