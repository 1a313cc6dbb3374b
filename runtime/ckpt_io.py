"""Durable, checksummed checkpoint files and the DeepSpeed checkpoint engine that writes them.

Every file DeepSpeed hands to :class:`VerifiedCheckpointEngine` is written to ``FILE.tmp``,
fsynced, renamed and its directory fsynced, and recorded as ``{"size", "xxh3_64", "rank"}``.
The checksum is XXH3-64 of the whole file, computed on the bytes as they are written (no
read-back): it catches truncation, torn writes and any flipped byte, and XXH3 runs at memory
speed (~3 GB/s on one loaded core here, ~5x zlib.crc32), so re-reading a shard to verify costs
about what loading it costs anyway. Sampling head and tail blocks would be cheaper still but
misses corruption in the middle of a multi-GB optimizer shard.

With ``async_save`` the engine snapshots each state dict to private CPU copies synchronously
(the tensors DeepSpeed hands over are the live fp32 partitions and Adam moments, updated in
place by the next step) and one background thread serializes and writes them while training
continues.
"""
from __future__ import annotations

import copy
import errno
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import torch
import xxhash
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

HASH = "xxh3_64"
_CHUNK = 8 << 20


class _HashingWriter:
    """A binary file wrapper that hashes and counts every byte written through it."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.hasher = xxhash.xxh3_64()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.hasher.update(view)
        self.size += len(view)
        return self._f.write(view)

    def flush(self) -> None:
        self._f.flush()


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WriteError(OSError):
    """A checkpoint file that could not be written; ``no_space`` when the file system is full."""

    def __init__(self, path: str, cause: BaseException) -> None:
        no_space = isinstance(cause, OSError) and cause.errno == errno.ENOSPC
        no_space = no_space or free_bytes(os.path.dirname(os.path.abspath(path))) == 0
        super().__init__(errno.ENOSPC if no_space else getattr(cause, "errno", None),
                         f"{type(cause).__name__}: {cause}".strip(), path)
        self.no_space = no_space


def free_bytes(path: str) -> int:
    """Free bytes of the file system holding ``path`` (its nearest existing ancestor)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_durable(obj: Any, path: str, rank: int) -> dict[str, Any]:
    """``torch.save(obj)`` to ``path`` atomically and durably; returns its manifest entry."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as raw:
            out = _HashingWriter(raw)
            torch.save(obj, out)
            raw.flush()
            os.fsync(raw.fileno())
    except Exception as err:  # a full disk surfaces as OSError(ENOSPC) or as torch's "unexpected pos"
        _remove_quietly(tmp)  # the partial file would only take space from the next try
        raise WriteError(path, err) from err
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    on_disk = os.path.getsize(path)
    if on_disk != out.size:  # the node confirms its own file before reporting it written
        raise OSError(f"{path}: {on_disk} bytes on disk after fsync, {out.size} written")
    return {"size": out.size, HASH: out.hasher.hexdigest(), "rank": rank}


def file_digest(path: str) -> tuple[int, str]:
    """Size and XXH3-64 of a file, streamed."""
    h = xxhash.xxh3_64()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def verify_files(tag_dir: str, files: dict[str, dict[str, Any]]) -> list[str]:
    """Problems of ``files`` (names relative to ``tag_dir`` -> manifest entries); empty if intact."""
    problems = []
    for name in sorted(files):
        entry, path = files[name], os.path.join(tag_dir, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        size = os.path.getsize(path)
        if size != entry["size"]:
            problems.append(f"{path}: {size} bytes, the marker records {entry['size']} (truncated or overwritten)")
            continue
        if file_digest(path)[1] != entry[HASH]:
            problems.append(f"{path}: {HASH} checksum differs from the marker (corrupted)")
    return problems


def snapshot(obj: Any, reuse: Optional[list[torch.Tensor]] = None) -> Any:
    """A copy of ``obj`` whose tensors are private CPU copies (containers rebuilt, rest shared).

    ``reuse``: CPU tensors of an earlier snapshot of the same structure, in traversal order;
    where shape and dtype match they are overwritten instead of allocating (no page faults on
    the next save). The list is replaced by this snapshot's tensors. GPU tensors are staged in
    pinned buffers by asynchronous copies on the current stream (the step is not held for
    them; later kernels on that stream run after them): :func:`staged` says when they landed."""
    old = list(reuse or [])
    taken: list[torch.Tensor] = []

    def copy_of(t: torch.Tensor) -> torch.Tensor:
        i = len(taken)
        buf = old[i] if i < len(old) else None
        if buf is not None and buf.shape == t.shape and buf.dtype == t.dtype:
            buf.copy_(t.detach(), non_blocking=t.is_cuda)
        elif t.is_cuda:  # pinned once, reused by the next saves: the copy runs on the copy engine
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t.detach(), non_blocking=True)
        else:
            buf = t.detach().to("cpu", copy=True)
        taken.append(buf)
        return buf

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return copy_of(o)
        if isinstance(o, dict):
            out = copy.copy(o)  # keeps the mapping type (OrderedDict, ...)
            for k, v in o.items():
                out[k] = walk(v)
            return out
        if isinstance(o, list):
            return [walk(v) for v in o]
        if isinstance(o, tuple) and not hasattr(o, "_fields"):
            return tuple(walk(v) for v in o)
        return o

    result = walk(obj)
    if reuse is not None:
        reuse[:] = taken
    return result


def staged(copies: list[torch.Tensor]) -> Optional[Any]:
    """A CUDA event recorded after a snapshot's asynchronous copies (``None`` when every source was
    on the CPU): the writer thread waits on it, the training thread does not."""
    if not torch.cuda.is_available() or not any(t.is_pinned() for t in copies):
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def write_staged(ready: Optional[Any], obj: Any, path: str, rank: int) -> dict[str, Any]:
    """The writer thread's task: wait for the snapshot's copies to land, then write durably."""
    if ready is not None:
        ready.synchronize()
    return write_durable(obj, path, rank)


def _lower_priority() -> None:
    """Let the training thread win the CPU over the writer thread (Linux: per-thread nice)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


class VerifiedCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed checkpoint engine: durable checksummed files, optionally written in the background.

    ``begin(tag_dir)`` starts a save, ``done()`` says whether its writes finished and
    ``wait()`` returns this rank's manifest (names relative to the tag directory) or raises
    the first write error. Loading is DeepSpeed's own (``torch.load`` of our own files).
    """

    def __init__(self, rank: int, async_save: bool) -> None:
        super().__init__(None)
        self.name = "VerifiedCheckpointEngine"
        self.rank = rank
        self.async_save = async_save
        self._pool: Optional[ThreadPoolExecutor] = None
        self._futures: list[tuple[str, Future]] = []
        self._entries: dict[str, dict[str, Any]] = {}
        self._tag_dir: Optional[str] = None
        self._buffers: dict[str, list[torch.Tensor]] = {}  # snapshot tensors per file, reused
        self._error: Optional[WriteError] = None  # the first failed write of the current save
        self.snapshot_s = 0.0

    def begin(self, tag_dir: str) -> None:
        if self._futures:
            raise RuntimeError("a checkpoint save is still in flight: wait() for it first")
        self._tag_dir, self._entries, self._error = os.path.abspath(tag_dir), {}, None
        self.snapshot_s = 0.0  # time this save spent copying state to CPU (training blocked)

    def _rel(self, path: str) -> str:
        if self._tag_dir is None:
            raise RuntimeError("VerifiedCheckpointEngine.save outside a CheckpointManager save")
        return os.path.relpath(os.path.abspath(path), self._tag_dir)

    def save(self, state_dict: Any, path: str) -> None:
        name = self._rel(path)
        if self._error is not None:  # a file of this save already failed: the save is lost, write no more
            return
        if not self.async_save:
            try:
                self._entries[name] = write_durable(state_dict, path, self.rank)
            except WriteError as err:  # kept for wait(): raising here would leave the other ranks in
                self._error = err      # DeepSpeed's barrier; the failure is decided collectively
            return
        # synchronous: the live tensors change at the next step. Buffers are reused across saves
        # (save() is only called once the previous write finished: CheckpointManager.finalize)
        t0 = time.perf_counter()
        buffers = self._buffers.setdefault(os.path.basename(path), [])
        copy = snapshot(state_dict, buffers)
        ready = staged(buffers)
        self.snapshot_s += time.perf_counter() - t0
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer",
                                            initializer=_lower_priority)
        self._futures.append((name, self._pool.submit(write_staged, ready, copy, path, self.rank)))

    def preserves_storage_sharing(self) -> bool:
        return not self.async_save  # our snapshot already copies every tensor

    def done(self) -> bool:
        return all(f.done() for _, f in self._futures)

    def wait(self) -> dict[str, dict[str, Any]]:
        futures, self._futures = self._futures, []
        for name, future in futures:
            self._entries[name] = future.result()  # re-raises a write error
        if self._error is not None:
            error, self._error, self._entries = self._error, None, {}
            raise error
        entries, self._entries = self._entries, {}
        return entries

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def install(engine: Any, rank: int, async_save: bool) -> VerifiedCheckpointEngine:
    """Put a :class:`VerifiedCheckpointEngine` into a DeepSpeed engine (once) and return it."""
    current = getattr(engine, "checkpoint_engine", None)
    if isinstance(current, VerifiedCheckpointEngine):
        current.async_save = async_save
        return current
    if current is not None and type(current) is not TorchCheckpointEngine:
        raise ValueError(f"the engine uses DeepSpeed's {type(current).__name__}; CheckpointManager writes its "
                         "own verified files: remove the 'checkpoint.writer' section of the DeepSpeed config "
                         "(use run.async_save for non-blocking saves)")
    engine.checkpoint_engine = VerifiedCheckpointEngine(rank, async_save)
    _guard_recovery_script(engine, engine.checkpoint_engine)
    return engine.checkpoint_engine


def _guard_recovery_script(engine: Any, writer: VerifiedCheckpointEngine) -> None:
    """DeepSpeed's rank 0 copies ``zero_to_fp32.py`` into each tag right before a barrier; on a full
    disk that copy would raise on rank 0 alone and leave every other rank in the barrier. The
    failure is recorded as the save's error instead (decided collectively at ``wait``)."""
    original = getattr(engine, "_copy_recovery_script", None)
    if original is None:
        return

    def guarded(save_path: str) -> None:
        try:
            original(save_path)
        except OSError as err:
            if writer._error is None:
                writer._error = WriteError(os.path.join(save_path, "zero_to_fp32.py"), err)

    engine._copy_recovery_script = guarded


__all__ = ["HASH", "VerifiedCheckpointEngine", "install", "write_durable", "file_digest", "verify_files",
           "snapshot", "fsync_dir", "WriteError", "free_bytes"]
