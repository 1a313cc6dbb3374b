"""Hang watchdog: a heartbeat thread per rank that ends a stalled job with its stacks on disk.

The training loop calls ``beat(step)`` as it makes progress. Every ``interval_s`` each rank's
thread writes ``output_dir/hang/hb_rank<N>.json`` (the step, when the loop last progressed, the
thread's own clock, whether the main thread is inside a collective) and reads every rank's file.
When some rank has made no progress for ``timeout_s`` (``run.dist_timeout_s``), every live rank
writes its Python stacks (faulthandler) to ``output_dir/hang/rank<N>.txt`` and the job exits with
code 4 and one line naming the stalled rank and step:

* a rank whose heartbeat thread stopped too is frozen or dead (SIGSTOP, a stuck driver): named
  "stopped"; a frozen rank on the same host is SIGKILLed so the launcher can end the job;
* otherwise the rank that is not waiting (the others wait for it) is "stalled". A rank waits inside a
  torch.distributed / DeepSpeed communication call (what gloo shows), or inside ``waiting()``: the
  step's host syncs (DeepSpeed's optimizer step, the agreed stop flag), where a rank waiting for a
  stalled peer blocks under NCCL, whose collectives return at once.

Heartbeats go through ``output_dir``, which all ranks must share (as for checkpoints); files of
an earlier launch are told apart by a per-launch nonce broadcast at start.
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn, Optional

import torch.distributed as dist

from .telemetry import get_logger

logger = get_logger("beit3.runtime.watchdog")
EXIT_HANG = 4
_COLLECTIVE_FILES = ("torch/distributed/", "deepspeed/comm/")


def in_collective(thread_id: int) -> bool:
    """Whether a thread is inside a torch.distributed / DeepSpeed communication call (or a ZeRO
    all-gather handle's ``wait``)."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if any(p in name for p in _COLLECTIVE_FILES) or (frame.f_code.co_name == "wait" and "deepspeed/" in name):
            return True
        frame = frame.f_back
    return False


class HangWatchdog:
    """Per-rank heartbeat thread; ``start()`` (collective), ``beat(step)``, ``stop()``."""

    def __init__(self, output_dir: str, rank: int, world_size: int, timeout_s: float,
                 interval_s: Optional[float] = None, timeout_field: str = "run.dist_timeout_s") -> None:
        self.timeout_field = timeout_field  # the config field of timeout_s, named in the hang line
        self.dir = Path(output_dir) / "hang"
        self.rank, self.world, self.timeout = rank, world_size, float(timeout_s)
        self.interval = interval_s if interval_s is not None else min(10.0, max(0.5, self.timeout / 10))
        self.host = socket.gethostname()
        self._step, self._progress, self._armed = 0, time.time(), False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._main = threading.main_thread().ident
        self.nonce = ""
        self._started = time.time()
        self._frozen_pids: list[int] = []
        self._waiting = 0

    @contextlib.contextmanager
    def waiting(self):
        """The main thread may wait here for the other ranks (a host sync after collectives): its
        heartbeat says so, so that a rank stalled elsewhere is the one named."""
        self._waiting += 1
        try:
            yield
        finally:
            self._waiting -= 1

    def start(self) -> "HangWatchdog":
        self.dir.mkdir(parents=True, exist_ok=True)
        nonce = [uuid.uuid4().hex if self.rank == 0 else ""]
        if self.world > 1:
            dist.broadcast_object_list(nonce, src=0)
        self.nonce = nonce[0]
        self._started = time.time()
        self._thread = threading.Thread(target=self._run, name="beit3-watchdog", daemon=True)
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        """The loop reached ``step`` (arms the watchdog on the first call, and writes the first
        heartbeat at once: a rank frozen before the thread's first write would otherwise have
        no heartbeat and be reported at step 0)."""
        first = not self._armed
        self._step, self._progress, self._armed = step, time.time(), True
        if first and self.nonce:
            try:
                self._write()
            except OSError as e:  # a full or vanished output_dir must not kill training
                logger.warning("watchdog: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval)

    # ---- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write()
                verdict = self._check() if self._armed else None
            except OSError as e:  # a full or vanished output_dir must not kill training
                logger.warning("watchdog: %s", e)
                continue
            if verdict is not None:
                self._fire(*verdict)

    def _write(self) -> None:
        row = {"nonce": self.nonce, "rank": self.rank, "pid": os.getpid(), "host": self.host, "step": self._step,
               "progress": self._progress if self._armed else self._started, "alive": time.time(),
               "in_collective": self._waiting > 0 or in_collective(self._main)}
        path = self.dir / f"hb_rank{self.rank}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")  # beat() and the thread both write
        tmp.write_text(json.dumps(row))
        os.replace(tmp, path)

    def _rows(self) -> dict[int, dict[str, Any]]:
        rows = {}
        for r in range(self.world):
            try:
                row = json.loads((self.dir / f"hb_rank{r}.json").read_text())
            except (OSError, ValueError):
                continue
            if row.get("nonce") == self.nonce:
                rows[r] = row
        return rows

    def _check(self) -> Optional[tuple[int, str, int, float, list[int]]]:
        """(culprit rank, what, its step, seconds without progress, live ranks), or None."""
        now, rows = time.time(), self._rows()
        for r in range(self.world):  # a rank that never wrote a heartbeat: silent since start
            rows.setdefault(r, {"rank": r, "step": 0, "progress": self._started, "alive": self._started,
                                "in_collective": False, "pid": None, "host": None})
        oldest = min(rows.values(), key=lambda row: row["progress"])
        if now - oldest["progress"] <= self.timeout:
            return None
        stale = max(3 * self.interval, 5.0)
        frozen = sorted(r for r, row in rows.items() if now - row["alive"] > stale)
        live = [r for r in rows if r not in frozen]
        if frozen:
            culprit, what = frozen[0], "stopped (no heartbeat: frozen or dead process)"
        else:
            idle = [row for row in rows.values() if not row["in_collective"]] or list(rows.values())
            culprit, what = min(idle, key=lambda row: (row["step"], row["progress"]))["rank"], "stalled"
        self._frozen_pids = [rows[r]["pid"] for r in frozen if rows[r]["host"] == self.host and rows[r]["pid"]]
        return culprit, what, int(rows[culprit]["step"]), now - rows[culprit]["progress"], live

    def _dumped(self, rank: int) -> bool:
        try:
            return (self.dir / f"rank{rank}.txt").stat().st_mtime >= self._started
        except OSError:
            return False

    def _fire(self, culprit: int, what: str, step: int, age: float, live: list[int]) -> None:
        line = (f"hang: rank {culprit} {what} at step {step}: no progress for {age:.0f} s "
                f"({self.timeout_field}={self.timeout:g}); stacks of ranks {live} in {self.dir}/rank<N>.txt")
        with open(self.dir / f"rank{self.rank}.txt", "w") as f:
            f.write(f"# rank {self.rank} pid {os.getpid()} host {self.host} step {self._step}\n# {line}\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        deadline = time.time() + max(2 * self.interval, 3.0)  # let the other ranks dump theirs first
        while time.time() < deadline and not all(self._dumped(r) for r in live):
            time.sleep(0.2)
        if self.rank == min(live, default=self.rank):
            print(line, file=sys.stderr, flush=True)
            if self._frozen_pids:  # a stopped process ignores the launcher's SIGTERM: SIGKILL it, but only
                # after this rank's exit code (4) reached the launcher, so that the job ends with 4, not -9
                pids = " ".join(str(pid) for pid in self._frozen_pids)
                subprocess.Popen(["sh", "-c", f"sleep 2; kill -9 {pids} 2>/dev/null"], start_new_session=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sys.stdout.flush()
        os._exit(EXIT_HANG)


def dump_stacks_on_signal(signum: int = signal.SIGUSR1) -> None:
    """``kill -USR1 <pid>`` prints every thread's Python stack of this process (and of loader
    workers forked after this call) to stderr; the process goes on."""
    faulthandler.register(signum, file=sys.stderr, all_threads=True)


def exit_within(code: int, grace_s: float = 120.0) -> NoReturn:
    """``sys.exit(code)`` whose shutdown is bounded: if the interpreter's exit hangs (a loader
    worker that does not stop, a peer gone mid-collective), the stacks go to stderr and the
    process ends with ``code`` after ``grace_s``."""
    def force() -> None:
        print(f"exit with code {code} still not done after {grace_s:g} s: stacks follow, forcing it",
              file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stdout.flush()
        os._exit(code)

    timer = threading.Timer(grace_s, force)
    timer.daemon = True
    timer.start()
    faulthandler.dump_traceback_later(grace_s + 30, exit=True)  # past the point where Python threads stop
    sys.exit(code)


__all__ = ["HangWatchdog", "EXIT_HANG", "in_collective", "dump_stacks_on_signal", "exit_within"]
