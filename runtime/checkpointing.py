"""Checkpoint save/resume for any DeepSpeed engine, and clean exit on preemption.

Layout under ``root``::

    root/step_00001000/          # engine.save_checkpoint(root, tag=...) (all ranks write)
    root/step_00001000/COMPLETE  # JSON marker + manifest, written by rank 0 after every rank confirmed
    root/latest                  # name of the newest COMPLETE tag (atomically replaced)

Every file of a tag is written durably (tmp file, fsync, rename) through
:class:`~beit3.runtime.ckpt_io.VerifiedCheckpointEngine`, which records its size and XXH3-64
checksum. Each rank confirms its own files (size on disk after fsync equals bytes written) and
sends its manifest to rank 0 over the process group; rank 0 writes the marker listing every
file of every rank. So the decision needs no shared file system: a node's files are checked by
that node (at save and at resume), never by rank 0 reading another node's disk.

With ``async_save`` the state is snapshotted to CPU and written by a background thread while
training continues; :meth:`CheckpointManager.poll` (every step) all-reduces whether every rank
finished, and only then is the marker written, at a later step. A process killed at any point
leaves no marker, so the tag is ignored and later pruned. A checkpoint whose weights are not
finite on any rank is never written. ``load("auto")`` verifies the newest complete tag (every
rank its own files) and falls back to the previous complete one with a warning naming the file.
The marker and the client state record the world size, so a resume on another world size is
detected before any load (``_load_resharded`` is the single place for universal conversion).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from beit3.runtime.ckpt_io import HASH, VerifiedCheckpointEngine, WriteError, free_bytes, install, verify_files

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
DAMAGED = "COMPLETE.damaged"  # a marker whose files failed verification, kept for inspection
LATEST = "latest"
UNIVERSAL_DIR = "universal"  # world-size-independent conversions of step_* tags
CLIENT_KEY = "client_state"  # our state, kept apart from the keys DeepSpeed adds
TAG_RE = re.compile(r"^step_(\d{8,})$")


EXIT_NO_SPACE = 5  # the run's last save could not be written for lack of space: a restart would not help


class UnsavedError(RuntimeError):
    """The run ended (finished or stopped by a signal) but its last save could not be written."""

    def __init__(self, unsaved: dict[str, Any], latest: Optional[str]) -> None:
        super().__init__(f"the last checkpoint {unsaved['tag']} was not saved ({unsaved['reason']}); the newest "
                         f"complete checkpoint is {latest}: free space and resume (run.resume=auto)")
        self.no_space = "bytes free" in unsaved["reason"]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked (incomplete, missing, damaged, other world size)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank (all-reduce MIN). Collective."""
    if _world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def _gather(obj: Any) -> list[Any]:
    if _world() == 1:
        return [obj]
    out: list[Any] = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object). Collective."""
    if _world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def check_ds_config(ds: dict[str, Any]) -> None:
    """Start-up check: the DeepSpeed config must leave checkpoint writing to us (a
    ``checkpoint.writer`` would replace the verified engine; ``run.async_save`` is ours)."""
    from beit3.model.config import ConfigError

    if (ds.get("checkpoint") or {}).get("writer") is not None:
        raise ConfigError("deepspeed_config checkpoint.writer: not supported (CheckpointManager writes verified "
                          "files itself); remove it and set run.async_save=true for non-blocking saves")
    from .engine import check_optimizer_ops

    check_optimizer_ops(ds)  # the optimizer's DeepSpeed op (ZeRO offload: cpu_adam) must be buildable


def nonfinite_params(engine: Any) -> list[str]:
    """Names of this rank's parameters with a NaN/Inf (its own ZeRO-3 partition, ``ds_tensor``)."""
    bad = []
    for name, p in engine.module.named_parameters():
        local = getattr(p, "ds_tensor", None)
        t = local if local is not None else p.detach()
        if t.numel() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


class CheckpointManager:
    """Numbered, crash-safe, verified DeepSpeed checkpoints with a ``latest`` pointer and pruning.

    ``save``, ``poll``, ``finalize`` and ``load`` are collective: every rank calls them.
    """

    def __init__(self, root: str, keep_last: int = 3, async_save: bool = False) -> None:
        if keep_last < 1:
            raise ValueError(f"CheckpointManager.keep_last={keep_last!r}: must be >= 1")
        self.root = root
        self.keep_last = keep_last
        self.async_save = async_save
        self._pending: Optional[dict[str, Any]] = None  # the save whose marker is not written yet
        self._writer: Optional[VerifiedCheckpointEngine] = None
        self.last_save: dict[str, Any] = {}  # tag, blocked_s (training stopped), total_s, bytes
        # the newest save that could not be written (a full disk): {"tag", "reason"}; None once a
        # later save completes. Training goes on and the next save retries (docs/pretraining.md)
        self.unsaved: Optional[dict[str, Any]] = None

    # ---- queries ---------------------------------------------------------------------------
    def is_complete(self, tag: str) -> bool:
        return os.path.isfile(os.path.join(self.root, tag, MARKER))

    def _tags(self) -> list[tuple[int, str]]:
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            m = TAG_RE.match(name)
            if m and os.path.isdir(os.path.join(self.root, name)):
                found.append((int(m.group(1)), name))
        return sorted(found)

    def complete_tags(self) -> list[str]:
        """Complete tags, oldest first."""
        return [t for _, t in self._tags() if self.is_complete(t)]

    def agreed_complete_tags(self) -> list[str]:
        """Rank 0's complete tags, oldest first, the same list on every rank (another node's view of
        a shared file system can lag the marker rank 0 just wrote). Collective."""
        return from_rank0(self.complete_tags() if _rank() == 0 else None)

    def latest_tag(self) -> Optional[str]:
        """The newest COMPLETE tag, or None. Incomplete directories (a save killed before its
        marker) are ignored; the ``latest`` pointer file is for humans and external tools."""
        complete = self.complete_tags()
        return complete[-1] if complete else None

    def marker(self, tag: str) -> dict[str, Any]:
        with open(os.path.join(self.root, tag, MARKER)) as f:
            return json.load(f)

    @property
    def pending_tag(self) -> Optional[str]:
        """The tag being written in the background (no marker yet), if any."""
        return self._pending["tag"] if self._pending else None

    def verify(self, tag: str, marker: Optional[dict[str, Any]] = None, ranks: Optional[set[int]] = None) -> list[str]:
        """Problems of ``tag``'s files against its marker (only files written by ``ranks`` when
        given); empty when intact. Local: reads files only."""
        marker = marker if marker is not None else self.marker(tag)
        files = marker.get("files")
        if files is None:  # a marker from before verified checkpoints: accepted as it was then
            logger.warning("%s has no file manifest: its files are not verified", os.path.join(self.root, tag, MARKER))
            return []
        if ranks is not None:
            files = {n: e for n, e in files.items() if e["rank"] in ranks}
        return verify_files(os.path.join(self.root, tag), files)

    # ---- save ------------------------------------------------------------------------------
    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> Optional[str]:
        """Save ``engine`` (model, optimizer, scheduler) plus ``client_state`` as
        ``step_{step:08d}``; returns the tag directory, or None when the weights are not finite
        on some rank (nothing written). Without ``async_save`` the tag is complete on return;
        with it, once :meth:`poll`/:meth:`finalize` saw every rank's files durable. Collective."""
        self.finalize()  # at most one save in flight
        t0 = time.perf_counter()
        bad = nonfinite_params(engine)
        if not all_ranks_true(not bad):
            named = {r: b[:3] for r, b in enumerate(_gather(bad)) if b}
            logger.error("not saving step %d: non-finite weights on rank(s) %s; the newest complete checkpoint "
                         "stays %s", step, named, self.latest_tag())
            return None
        tag = tag_for_step(step)
        path = os.path.join(self.root, tag)
        if self._refuse_for_space(tag):
            return None
        state = dict(client_state)
        state.setdefault("step", step)
        state["world_size"] = _world()
        if _rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            for name in (MARKER, DAMAGED):  # re-saving a step: invalidate first
                if os.path.exists(os.path.join(path, name)):
                    os.remove(os.path.join(path, name))
        _barrier()
        self._writer = install(engine, _rank(), self.async_save)
        self._writer.begin(path)
        engine.save_checkpoint(self.root, tag=tag, client_state={CLIENT_KEY: state}, save_latest=False)
        self._pending = {"tag": tag, "step": step, "t0": t0, "blocked_s": time.perf_counter() - t0,
                         "zero_stage": int(getattr(engine, "zero_optimization_stage", lambda: 0)())}
        if not self.async_save:
            self.finalize()
        return path

    def poll(self) -> Optional[str]:
        """Call once per step: when every rank's background writes finished, write the marker.
        Returns the tag completed now, if any. Collective (a no-op when nothing is pending)."""
        if self._pending is None:
            return None
        if not all_ranks_true(self._writer.done()):
            return None
        return self.finalize()

    def finalize(self) -> Optional[str]:
        """Wait for the pending save on every rank, then rank 0 writes its marker (listing every
        rank's files), ``latest`` and prunes. Returns the completed tag (None if nothing pending
        or a rank failed to write: the tag stays incomplete). Collective."""
        if self._pending is None:
            return None
        pending, self._pending = self._pending, None
        try:
            entries, error = self._writer.wait(), None
        except Exception as err:  # noqa: BLE001 - reported collectively below
            entries, error = {}, f"{type(err).__name__}: {err}"
            if isinstance(err, WriteError) and err.no_space:
                error = f"no space left: {err.filename}"
        reports = _gather({"rank": _rank(), "files": entries, "error": error})
        errors = {r["rank"]: r["error"] for r in reports if r["error"]}
        tag = pending["tag"]
        if errors:
            self._unwritable(tag, errors)
            return None
        files = {name: entry for r in reports for name, entry in r["files"].items()}
        total_s = time.perf_counter() - pending["t0"]
        self.last_save = {"tag": tag, "blocked_s": pending["blocked_s"], "total_s": total_s,
                          "snapshot_s": self._writer.snapshot_s,
                          "bytes": sum(e["size"] for e in files.values()), "files": len(files)}
        marked = self._write_marker(tag, pending, files) if _rank() == 0 else None
        marked = from_rank0(marked)  # rank 0's marker write decides for every rank
        if marked is not None:
            self._unwritable(tag, {0: marked})
            return None
        self.unsaved = None
        if _rank() == 0:
            self._prune()
            logger.info("checkpoint %s complete: %d files, %.1f MB; training blocked %.2f s, written in %.2f s",
                        tag, len(files), self.last_save["bytes"] / 2 ** 20, pending["blocked_s"], total_s)
        _barrier()
        return tag

    def _write_marker(self, tag: str, pending: dict[str, Any], files: dict[str, Any]) -> Optional[str]:
        """Rank 0: the marker, then ``latest``; the marker's write error (None when written)."""
        meta = {"tag": tag, "step": pending["step"], "world_size": _world(), "time": time.time(),
                "zero_stage": pending["zero_stage"], "hash": HASH, "files": files}
        try:
            _atomic_write(os.path.join(self.root, tag, MARKER), json.dumps(meta))
        except OSError as err:
            return f"{'no space left' if err.errno == errno.ENOSPC else type(err).__name__}: marker of {tag}: {err}"
        try:
            _atomic_write(os.path.join(self.root, LATEST), tag)
        except OSError as err:  # the tag is complete (its marker decides); ``latest`` is for humans
            logger.warning("checkpoint %s is complete but %s was not updated: %s", tag, LATEST, err)
        return None

    # ---- a full disk ------------------------------------------------------------------------
    def _bytes_needed(self) -> int:
        """This rank's bytes in the newest complete tag (what the next save will write); 0 unknown."""
        tag = self.latest_tag()
        if tag is None:
            return 0
        files = self.marker(tag).get("files") or {}
        return sum(e["size"] for e in files.values() if e.get("rank") == _rank() % max(1, _world()))

    def _refuse_for_space(self, tag: str) -> bool:
        """Before a save: every rank compares its free bytes with the size of its part of the last
        checkpoint (+5%); if one lacks room, no rank writes (one line names the tag, the directory,
        the bytes needed and free). Collective."""
        need, free = int(self._bytes_needed() * 1.05), free_bytes(self.root)
        short = [r for r in _gather((need, free) if need > free else None) if r]
        if not short:
            return False
        need, free = max(n for n, _ in short), min(f for _, f in short)
        self._report_unsaved(tag, f"{free} bytes free, {need} needed (the size of the last checkpoint's part "
                                  f"of a rank, +5%)")
        return True

    def _unwritable(self, tag: str, errors: dict[int, str]) -> None:
        """A save that failed on some rank: its files are removed (they would only take space) and
        the run goes on. Collective."""
        shutil.rmtree(os.path.join(self.root, tag), ignore_errors=True)  # each rank its own files
        _barrier()
        no_space = any(e.startswith("no space left") for e in errors.values())
        detail = f"{free_bytes(self.root)} bytes free, {self._bytes_needed() or 'unknown'} needed" if no_space else ""
        self._report_unsaved(tag, f"{detail + '; ' if detail else ''}writing failed on rank(s) {errors}")

    def _report_unsaved(self, tag: str, reason: str) -> None:
        self.unsaved = {"tag": tag, "reason": reason}
        if _rank() == 0:
            logger.error("checkpoint %s NOT saved in %s: %s; the newest complete checkpoint stays %s; training "
                         "goes on and the next save retries", tag, self.root, reason, self.latest_tag())

    def raise_if_unsaved(self) -> None:
        """At the end of a run: raise :class:`UnsavedError` when its last save was not written."""
        if self.unsaved is not None:
            raise UnsavedError(self.unsaved, self.latest_tag())

    def _prune(self) -> None:
        """Keep the last ``keep_last`` complete tags; drop incomplete ones older than the newest
        complete one (leftovers of killed saves)."""
        complete = self.complete_tags()
        keep = set(complete[-self.keep_last:])
        newest = int(TAG_RE.match(complete[-1]).group(1)) if complete else -1
        for step, tag in self._tags():
            stale_incomplete = not self.is_complete(tag) and step < newest
            if (tag in complete and tag not in keep) or stale_incomplete:
                shutil.rmtree(os.path.join(self.root, tag), ignore_errors=True)
                shutil.rmtree(os.path.join(self.root, UNIVERSAL_DIR, tag), ignore_errors=True)
                logger.info("pruned checkpoint %s", tag)

    # ---- load ------------------------------------------------------------------------------
    def _verify_collective(self, tag: str, marker: dict[str, Any]) -> list[str]:
        """Every rank checks the files written by the ranks it stands for (rank ``r % world``);
        the problems of all ranks, the same list on every rank. Collective."""
        mine = {r for r in range(int(marker.get("world_size", 1))) if r % _world() == _rank()}
        local = self.verify(tag, marker, mine)
        return [p for problems in _gather(local) for p in problems]

    def _set_aside(self, tag: str) -> None:
        if _rank() == 0:  # no longer complete: never chosen again, pruned like a killed save
            os.replace(os.path.join(self.root, tag, MARKER), os.path.join(self.root, tag, DAMAGED))

    def _choose(self, tag: str) -> Optional[tuple[str, dict[str, Any]]]:
        """The tag to load and its marker (rank 0's view, broadcast), verified on every rank."""
        if tag != "auto":
            if not from_rank0(self.is_complete(tag)):
                raise CheckpointError(f"checkpoint {os.path.join(self.root, tag)} is missing or incomplete "
                                      f"(no {MARKER} marker); complete ones: {self.complete_tags()}")
            marker = from_rank0(self.marker(tag) if _rank() == 0 else None)
            problems = self._verify_collective(tag, marker)
            if problems:
                raise CheckpointError(f"checkpoint {tag} fails verification: " + "; ".join(problems))
            return tag, marker
        candidates = from_rank0(list(reversed(self.complete_tags())) if _rank() == 0 else None)
        for cand in candidates:
            marker = from_rank0(self.marker(cand) if _rank() == 0 else None)
            problems = self._verify_collective(cand, marker)
            if not problems:
                return cand, marker
            logger.warning("checkpoint %s is damaged, falling back to the previous complete one: %s",
                           cand, "; ".join(problems))
            self._set_aside(cand)
        if candidates:
            raise CheckpointError(f"no intact checkpoint under {self.root}: all of {candidates} failed verification")
        return None

    def load(self, engine: Any, tag: str = "auto", load_optimizer_states: bool = True) -> Optional[dict[str, Any]]:
        """Restore ``engine`` from ``tag`` (``auto``: the newest complete one whose files verify,
        falling back over damaged ones). Returns the saved client state, or None when there is
        nothing to resume. Collective."""
        self.finalize()
        chosen = self._choose(tag)
        if chosen is None:
            logger.info("no complete checkpoint under %s: starting fresh", self.root)
            return None
        tag, marker = chosen
        saved_world = int(marker.get("world_size", _world()))
        if saved_world != _world():
            return self._load_resharded(engine, tag, saved_world, load_optimizer_states)
        load_path, client_state = engine.load_checkpoint(
            self.root, tag=tag, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_optimizer_states)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {os.path.join(self.root, tag)}")
        state = dict((client_state or {}).get(CLIENT_KEY, {}))
        logger.info("resumed from %s (step %s)", load_path, state.get("step"))
        return state

    def _load_resharded(self, engine: Any, tag: str, saved_world: int,
                        load_optimizer_states: bool) -> dict[str, Any]:
        """Resume on a different world size through DeepSpeed's universal checkpoint.

        Rank 0 converts ``root/tag`` once into ``root/universal/tag`` (``ds_to_universal``,
        marked complete like a save); every rank then loads it with ``load_universal``
        switched on for this load only, so later saves are ordinary sharded checkpoints.
        """
        udir = os.path.join(self.root, UNIVERSAL_DIR, tag)
        if _rank() == 0 and not os.path.isfile(os.path.join(udir, MARKER)):
            from types import SimpleNamespace

            from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

            t0 = time.perf_counter()
            shutil.rmtree(udir, ignore_errors=True)
            ds_to_universal(SimpleNamespace(
                input_folder=os.path.join(self.root, tag), output_folder=udir, num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
            _atomic_write(os.path.join(udir, MARKER), json.dumps({"tag": tag, "from_world_size": saved_world}))
            logger.info("converted %s (world size %d) to a universal checkpoint in %.1f s",
                        tag, saved_world, time.perf_counter() - t0)
        _barrier()
        config = engine._config
        previous = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            load_path, client_state = engine.load_checkpoint(
                os.path.join(self.root, UNIVERSAL_DIR), tag=tag, load_optimizer_states=load_optimizer_states,
                load_lr_scheduler_states=load_optimizer_states)
        finally:
            config.load_universal_checkpoint = previous
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {udir}")
        state = dict((client_state or {}).get(CLIENT_KEY, {}))
        logger.info("resumed from %s saved with world size %d, now %d (step %s)",
                    tag, saved_world, _world(), state.get("step"))
        return state


class PreemptionGuard:
    """Turns SIGTERM/SIGINT into a flag checked at step boundaries.

    ``should_stop()`` all-reduces the flag (MAX) so every rank agrees and they all save and
    exit together. A second SIGINT restores the default behaviour (KeyboardInterrupt). Use as a
    context manager to restore the previous handlers.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.requested = False
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        logger.warning("received signal %d: will save and exit at the next step boundary", signum)

    def should_stop(self) -> bool:
        """True on every rank when any rank received a signal. Collective."""
        return not all_ranks_true(not self.requested)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "PreemptionGuard":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


__all__ = ["CheckpointManager", "CheckpointError", "PreemptionGuard", "tag_for_step", "nonfinite_params",
           "check_ds_config", "all_ranks_true", "from_rank0", "MARKER", "DAMAGED", "LATEST"]
