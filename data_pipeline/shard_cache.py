"""A bounded node-local cache of whole remote shards, shared by the workers and ranks of one node.

``NodeShardCache.open(url)`` returns an open file of the shard, downloading it first when it is
not in ``cache_dir``. All processes of a node pointing at the same ``cache_dir`` share it:

* a download holds a per-shard file lock (``filelock``, ``flock`` based), writes a temp file
  and renames it into place, so a partial download is never seen under the shard's name and a
  shard is downloaded once however many processes ask for it at the same time;
* a failed or short transfer is retried ``retries`` times with exponential backoff (counted);
  a shard that stays unreachable raises ``RemoteError`` (the loader then skips it like an
  unreadable local shard, named once in the log) and is marked, so the other processes of the
  node skip it at once for ``FAILED_TTL_S`` instead of retrying it again each;
* the complete shards in the directory are kept within ``size_bytes`` by LRU eviction (last
  use = file mtime, refreshed on every open). A file evicted while a process still reads it
  stays readable through the open handle (POSIX unlink), so eviction never corrupts a read;
  in-flight temp files (one per downloading process) come on top of the bound.

``Prefetcher`` fetches the shards of the current and the next shuffle window ahead of use in
background threads, as many as fit in the cache next to the shard being read.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

from filelock import FileLock

from .config import DataConfig, DataConfigError
from .remote import RemoteError, download, redact

logger = logging.getLogger(__name__)
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PART = re.compile(r"\.part-(\d+)-")


def default_cache_dir() -> str:
    """``$TMPDIR/beit3-shard-cache-<uid>``: node-local on clusters where TMPDIR is local disk."""
    return os.path.join(tempfile.gettempdir(), f"beit3-shard-cache-{os.getuid()}")


def cache_name(url: str) -> str:
    """File name of a shard in the cache: a hash of the full location plus a readable tail."""
    digest = hashlib.sha1(url.encode("utf-8")).hexdigest()[:20]
    tail = _SAFE.sub("_", url.rstrip("/").rsplit("/", 1)[-1])[-60:]
    return f"{digest}-{tail}" + ("" if tail.endswith(".tar") else ".tar")


class NodeShardCache:
    """Whole-shard download cache in ``cache_dir`` (see the module docstring).

    ``stats`` counts, per process: ``hit`` (opened from the cache), ``fetch`` (downloaded on
    demand), ``prefetch`` (downloaded ahead), ``retry``, ``failed`` (gave up), ``evict``,
    ``fetched_bytes``; ``take_stats()`` returns and clears them.
    """

    FAILED_TTL_S = 600.0

    def __init__(self, cache_dir: str, size_bytes: int, retries: int = 5, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0, fetch: Callable[[str, str], int] = download) -> None:
        if size_bytes <= 0:
            raise ValueError(f"size_bytes must be > 0, got {size_bytes}")
        self.dir = Path(cache_dir or default_cache_dir())
        self.locks = self.dir / ".locks"
        self.locks.mkdir(parents=True, exist_ok=True)
        self.size_bytes, self.retries = int(size_bytes), int(retries)
        self.backoff_s, self.max_backoff_s = float(backoff_s), float(max_backoff_s)
        self._fetch = fetch
        self.stats: Counter = Counter()
        self.max_shard_bytes = 0  # largest shard seen by this process (sizes prefetching)
        self._mu = threading.Lock()

    @classmethod
    def from_config(cls, cfg: "DataConfig") -> "NodeShardCache":
        """The cache of ``cfg.cache_dir`` / ``cache_size_gb`` / ``remote_retries`` / ``remote_backoff_s``;
        a ``DataConfigError`` naming ``data.cache_dir`` when the directory cannot be created."""
        try:
            return cls(cfg.cache_dir, int(cfg.cache_size_gb * (1 << 30)), cfg.remote_retries, cfg.remote_backoff_s)
        except OSError as e:
            raise DataConfigError(f"data.cache_dir: cannot use {cfg.cache_dir or default_cache_dir()!r}: {e}") from None

    # ---- public --------------------------------------------------------------------------
    def open(self, url: str, prefetch: bool = False) -> BinaryIO:
        """An open binary file of the shard at ``url`` (downloaded first on a miss)."""
        path = self.dir / cache_name(url)
        f = self._open_cached(path)
        if f is None:
            with FileLock(str(self.locks / (path.name + ".lock"))):
                f = self._open_cached(path)  # another process may have fetched it meanwhile
                if f is None:
                    self._check_not_failed(url, path)
                    return self._download(url, path, "prefetch" if prefetch else "fetch")
        if not prefetch:
            self._count("hit")
        return f

    def capacity_shards(self) -> int | None:
        """Shards of the largest size seen so far that fit in the cache (None before the first)."""
        return max(1, self.size_bytes // self.max_shard_bytes) if self.max_shard_bytes else None

    def cached_bytes(self) -> int:
        """Bytes of the complete shards in the directory now."""
        return sum(size for _, size, _ in self._entries())

    def take_stats(self) -> dict[str, int]:
        with self._mu:
            out, self.stats = dict(self.stats), Counter()
        return out

    # ---- internals -----------------------------------------------------------------------
    def _count(self, key: str, n: int = 1) -> None:
        with self._mu:
            self.stats[key] += n

    def _open_cached(self, path: Path) -> BinaryIO | None:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return None
        try:
            os.utime(f.fileno())  # last use, for the LRU order of every process on the node
        except OSError:
            pass
        self._note_size(os.fstat(f.fileno()).st_size)
        return f

    def _failed_marker(self, path: Path) -> Path:
        return self.locks / (path.name + ".failed")

    def _check_not_failed(self, url: str, path: Path) -> None:
        """A shard another process of the node gave up on in the last ``FAILED_TTL_S`` fails at
        once (no second round of retries per worker); after that it is tried again."""
        try:
            age = time.time() - self._failed_marker(path).stat().st_mtime
        except FileNotFoundError:
            return
        if age < self.FAILED_TTL_S:
            self._count("failed")
            raise RemoteError(f"{redact(url)}: unreachable (given up on {age:.0f}s ago on this node)")

    def _note_size(self, n: int) -> None:
        self.max_shard_bytes = max(self.max_shard_bytes, int(n))

    def _download(self, url: str, path: Path, kind: str) -> BinaryIO:
        tmp = path.with_name(f"{path.name}.part-{os.getpid()}-{threading.get_ident()}")
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                n = self._fetch(url, str(tmp))
            except (RemoteError, OSError) as e:
                tmp.unlink(missing_ok=True)
                if attempt == self.retries:
                    self._count("failed")
                    self._failed_marker(path).touch()
                    logger.warning("remote shard %s unreachable after %d attempt(s) (%s); its samples are skipped",
                                   redact(url), attempt + 1, redact(str(e))[:300])
                    raise RemoteError(f"{redact(url)}: unreachable after {attempt + 1} attempt(s): {e}") from None
                self._count("retry")
                logger.info("remote shard %s: attempt %d failed (%s); retrying in %.2fs",
                            redact(url), attempt + 1, redact(str(e))[:200], delay)
                time.sleep(delay)
                delay = min(self.max_backoff_s, delay * 2)
                continue
            self._failed_marker(path).unlink(missing_ok=True)
            self._count(kind)
            self._count("fetched_bytes", n)
            self._note_size(n)
            with FileLock(str(self.locks / "evict.lock")):  # room first, then visible: never above the bound
                self._make_room(n)
                os.replace(tmp, path)
                f = open(path, "rb")
                if n > self.size_bytes:  # larger than the whole cache: read through this handle only
                    path.unlink()
                    self._count("evict")
            return f
        raise AssertionError("unreachable")

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for p in self.dir.iterdir():
            if p.suffix != ".tar":
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def _make_room(self, incoming: int) -> None:
        """Remove least recently used shards until the cached ones plus ``incoming`` fit (the
        caller holds the eviction lock)."""
        entries = self._entries()
        total = sum(size for _, size, _ in entries) + incoming
        for _, size, p in entries:
            if total <= self.size_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
            self._count("evict")
        self._remove_stale_parts()

    def _remove_stale_parts(self) -> None:
        """Temp files of processes that died mid-download (pid gone on this node)."""
        for p in self.dir.glob("*.part-*"):
            m = _PART.search(p.name)
            if m is None:
                continue
            try:
                os.kill(int(m.group(1)), 0)
            except ProcessLookupError:
                p.unlink(missing_ok=True)
            except PermissionError:
                pass


class Prefetcher:
    """Downloads upcoming shards in background threads (started lazily, per process)."""

    def __init__(self, cache: NodeShardCache, threads: int = 2) -> None:
        self.cache, self.threads = cache, int(threads)
        self._pool: ThreadPoolExecutor | None = None
        self._pid = -1
        self._queued: set[str] = set()
        self._seen: set[tuple[int, int]] = set()

    def ahead(self, window: tuple[int, int], urls: Sequence[str]) -> None:
        """Queue ``urls`` (current window first, then the next one) once per ``window`` key;
        only as many as the cache holds next to the shard in use."""
        if self.threads <= 0 or window in self._seen:
            return
        self._seen.add(window)
        cap = self.cache.capacity_shards()
        urls = list(dict.fromkeys(urls))
        if cap is not None:
            urls = urls[:max(0, cap - 1)]
        if self._pool is None or self._pid != os.getpid():  # a forked worker needs its own threads
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="shard-prefetch")
            self._pid, self._queued = os.getpid(), set()
        for url in urls:
            if url not in self._queued:
                self._queued.add(url)
                self._pool.submit(self._one, url)

    def _one(self, url: str) -> None:
        try:
            self.cache.open(url, prefetch=True).close()
        except RemoteError:
            pass  # named in the log; the reader meets the same error and skips the shard
        finally:
            self._queued.discard(url)


__all__ = ["NodeShardCache", "Prefetcher", "cache_name", "default_cache_dir"]
