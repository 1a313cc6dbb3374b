"""Checkpoint save/resume for any DeepSpeed engine, and clean exit on preemption.

Layout under ``root``::

    root/step_00001000/          # engine.save_checkpoint(root, tag=...) (all ranks write)
    root/step_00001000/COMPLETE  # JSON marker, written by rank 0 after every rank finished
    root/latest                  # name of the newest COMPLETE tag (atomically replaced)

A save interrupted at any point leaves either no marker (the directory is ignored and later
pruned) or a complete checkpoint; ``latest`` only ever names a complete one. The marker and the
client state record the world size, so a resume on another world size is detected before any
load (``_load_resharded`` is the single place to add universal-checkpoint conversion).
"""
from __future__ import annotations

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

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
LATEST = "latest"
UNIVERSAL_DIR = "universal"  # world-size-independent conversions of step_* tags
CLIENT_KEY = "client_state"  # our state, kept apart from the keys DeepSpeed adds
TAG_RE = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used as asked (incomplete, missing, other world size)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointManager:
    """Numbered, crash-safe DeepSpeed checkpoints with a ``latest`` pointer and pruning.

    ``save`` and ``load`` are collective: every rank calls them.
    """

    def __init__(self, root: str, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"CheckpointManager.keep_last={keep_last!r}: must be >= 1")
        self.root = root
        self.keep_last = keep_last

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

    def latest_tag(self) -> Optional[str]:
        """The newest COMPLETE tag, or None. Incomplete directories (a save killed before its
        marker) are ignored; the ``latest`` pointer file is for humans and external tools."""
        complete = self.complete_tags()
        return complete[-1] if complete else None

    def marker(self, tag: str) -> dict[str, Any]:
        with open(os.path.join(self.root, tag, MARKER)) as f:
            return json.load(f)

    # ---- save ------------------------------------------------------------------------------
    def save(self, engine: Any, step: int, client_state: dict[str, Any]) -> str:
        """Save ``engine`` (model, optimizer, scheduler, RNG-free) plus ``client_state`` as
        ``step_{step:08d}``; returns the tag directory. Collective."""
        tag = tag_for_step(step)
        path = os.path.join(self.root, tag)
        state = dict(client_state)
        state.setdefault("step", step)
        state["world_size"] = _world()
        if _rank() == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(os.path.join(path, MARKER)):  # re-saving a step: invalidate first
                os.remove(os.path.join(path, MARKER))
        _barrier()
        t0 = time.perf_counter()
        engine.save_checkpoint(self.root, tag=tag, client_state={CLIENT_KEY: state}, save_latest=False)
        _barrier()  # every rank has written its shards
        if _rank() == 0:
            meta = {"tag": tag, "step": step, "world_size": _world(), "time": time.time(),
                    "zero_stage": int(getattr(engine, "zero_optimization_stage", lambda: 0)())}
            _atomic_write(os.path.join(path, MARKER), json.dumps(meta))
            _atomic_write(os.path.join(self.root, LATEST), tag)
            self._prune()
            logger.info("saved checkpoint %s in %.1f s", path, time.perf_counter() - t0)
        _barrier()
        return path

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
    def load(self, engine: Any, tag: str = "auto", load_optimizer_states: bool = True) -> Optional[dict[str, Any]]:
        """Restore ``engine`` from ``tag`` (``auto``: the newest complete one). Returns the saved
        client state, or None when there is nothing to resume. Collective."""
        if tag == "auto":
            tag = self.latest_tag()
            if tag is None:
                logger.info("no complete checkpoint under %s: starting fresh", self.root)
                return None
        elif not self.is_complete(tag):
            raise CheckpointError(f"checkpoint {os.path.join(self.root, tag)} is missing or incomplete "
                                  f"(no {MARKER} marker); complete ones: {self.complete_tags()}")
        saved_world = int(self.marker(tag).get("world_size", _world()))
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
        flag = self.requested
        if _world() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) \
                if dist.get_backend() == "nccl" else torch.device("cpu")
            t = torch.tensor([1.0 if flag else 0.0], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "PreemptionGuard":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


__all__ = ["CheckpointManager", "CheckpointError", "PreemptionGuard", "tag_for_step", "MARKER", "LATEST"]
