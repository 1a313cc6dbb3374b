"""Helpers shared by the shard-writing command-line tools.

``--workers N`` (``write_sharded``): this process plans the shards from each sample's size
(``ShardWriter``'s rule: ``--maxcount`` samples, ``--maxsize`` bytes) and N processes build the
samples (read + verify an image, ...) and write whole shards, so shard names, boundaries and bytes
do not depend on N (tar member mtimes are fixed: ``SOURCE_DATE_EPOCH``, default 0); a sample that
turns out unusable is dropped from its planned shard. ``ordered_map`` runs per-item work
(tokenizing) in N processes with results in input order.
"""
from __future__ import annotations

import argparse
import io
import itertools
import logging
import multiprocessing as mp
import os
import signal
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass
class Workers:
    """``n`` forked worker processes (``pool``), or this process alone (``n == 1``, ``pool`` None)."""

    n: int
    pool: Optional[Any] = None


# blocked in the parent from fork until a worker has set its own handlers (``worker_pool``)
_WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@contextmanager
def worker_pool(n: int, initializer: Optional[Callable[..., None]] = None, initargs: tuple = ()) -> Iterator[Workers]:
    """``Workers`` for ``ordered_map`` / ``write_sharded``; ``initializer(*initargs)`` runs once in each
    process (in this one when ``n == 1``). Worker functions must be module-level."""
    if n < 1:
        raise ValueError(f"--workers must be >= 1, got {n}")
    if n == 1:
        if initializer is not None:
            initializer(*initargs)
        yield Workers(1)
        return
    # SIGTERM/SIGINT stay blocked from fork until a worker has its own handlers (``_worker_start``): a
    # ``Pool.terminate`` that came before would hit the inherited flag-only handler, and the worker
    # would then wait on the task queue's lock (held by the terminating parent) forever. The pool's
    # threads and later re-forks inherit the blocked mask; the parent takes its signals on this thread.
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
    try:
        pool = mp.get_context("fork").Pool(n, _worker_start, (initializer, initargs))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    with pool:
        yield Workers(n, pool)


def _worker_start(initializer: Optional[Callable[..., None]], initargs: tuple) -> None:
    """A forked worker inherits the parent's Python signal handlers (a trainer's or supervisor's
    SIGTERM handler that only sets a flag): with them, ``Pool.terminate`` could not end a worker
    waiting on the task queue, and the pool's exit would wait for it forever."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)  # a SIGTERM that came early ends it now
    if initializer is not None:
        initializer(*initargs)


def _run_chunk(fn: Callable[[Any], Any], chunk: list) -> list:
    return [fn(x) for x in chunk]


def ordered_map(fn: Callable[[Any], Any], items: Iterable, workers: Workers, chunksize: int = 16) -> Iterator[Any]:
    """``map(fn, items)`` in input order, on ``workers``; at most ``2 * n`` chunks of ``chunksize``
    items are in flight, so ``items`` may be a long stream. ``fn``'s exceptions propagate."""
    if workers.pool is None:
        yield from map(fn, items)
        return
    it = iter(items)
    pending: deque = deque()

    def submit() -> None:
        chunk = list(itertools.islice(it, chunksize))
        if chunk:
            pending.append(workers.pool.apply_async(_run_chunk, (fn, chunk)))

    for _ in range(2 * workers.n):
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


def planned_size(sample: dict[str, Any]) -> int:
    """``ShardWriter``'s size estimate of a sample (bytes and str by length, other fields 64)."""
    return sum(len(v) if isinstance(v, (bytes, str)) else 64 for k, v in sample.items() if k != "__key__")


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # missing: the worker reports it


def plan_shards(items: Iterable[tuple[Any, int]], maxcount: int, maxsize: int) -> Iterator[list[Any]]:
    """Group ``(job, planned size)`` items into shards: ``ShardWriter``'s rule (a new shard after
    ``maxcount`` samples, or before the one that would pass ``maxsize`` bytes)."""
    cur: list[Any] = []
    nbytes = 0
    for job, size in items:
        if cur and (len(cur) >= maxcount or nbytes + size > maxsize):
            yield cur
            cur, nbytes = [], 0
        cur.append(job)
        nbytes += size + 1024
    if cur:
        yield cur


def _write_shard(path: str, jobs: list, make: Callable[[Any], Any], mtime: float) -> tuple[int, dict[str, int]]:
    """Write ``make(job)`` of every job (a sample dict, or a skip reason str) into one tar."""
    import webdataset as wds

    skipped: Counter = Counter()
    count = 0
    tmp = path + ".tmp"
    writer = wds.TarWriter(tmp, mtime=mtime)
    for job in jobs:
        sample = make(job)
        if isinstance(sample, str):
            skipped[sample] += 1
            continue
        writer.write(sample)
        count += 1
    writer.close()
    os.replace(tmp, path)
    return count, dict(skipped)


def write_sharded(items: Iterable[tuple[Any, int]], make: Callable[[Any], Any], out_dir: Path, prefix: str,
                  source: str, args: argparse.Namespace, meta: dict[str, Any],
                  workers: Optional[Workers] = None) -> tuple[Path, int, Counter]:
    """Shards ``{out_dir}/{prefix}-NNNNNN.tar`` of ``make(job)`` for ``(job, planned size)`` items and
    their manifest; ``args``: ``add_shard_args``' options. ``make`` (module level) returns the sample
    or a skip reason; it runs on ``workers`` (default: a pool of ``args.workers``), one shard per
    process at a time, at most ``2 * n`` planned shards in flight. Returns (manifest, samples written,
    skip counts)."""
    if workers is None:
        with worker_pool(args.workers) as own:
            return write_sharded(items, make, out_dir, prefix, source, args, meta, own)
    from tqdm import tqdm

    from .shards import write_manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    mtime, entries, skipped = shard_mtime(), [], Counter()
    bar = tqdm(desc=f"{prefix} shards", unit="shard", disable=args.quiet)

    def done(count: int, skips: dict[str, int]) -> None:
        entries.append({"path": f"{prefix}-{len(entries):06d}.tar", "count": count})
        skipped.update(skips)
        bar.update(1)

    shards = enumerate(plan_shards(items, args.maxcount, int(args.maxsize)))
    if workers.pool is None:
        for k, jobs in shards:
            done(*_write_shard(str(out_dir / f"{prefix}-{k:06d}.tar"), jobs, make, mtime))
    else:
        pending: deque = deque()
        for k, jobs in shards:
            task = (str(out_dir / f"{prefix}-{k:06d}.tar"), jobs, make, mtime)
            pending.append(workers.pool.apply_async(_write_shard, task))
            while len(pending) > 2 * workers.n or (pending and pending[0].ready()):
                done(*pending.popleft().get())
        while pending:
            done(*pending.popleft().get())
    bar.close()
    manifest = write_manifest(out_dir / "manifest.json", source, entries, meta)
    return manifest, sum(e["count"] for e in entries), skipped


def report(tool: str, written: int, skipped: Counter, manifest: Path) -> None:
    msg = f"{tool}: wrote {written} samples; manifest {manifest}"
    if skipped:
        msg += f"; skipped {sum(skipped.values())} ({dict(skipped)})"
    print(msg)


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
