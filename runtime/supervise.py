"""Relaunch a failed training job until it finishes.

    python -m beit3.runtime.supervise [--max-restarts N] [--backoff S] -- \\
        deepspeed pretrain/train.py --config exp.yaml [key=value ...]

The command runs in its own process group. Exit code 0 ends supervision; 2 (a configuration
error), 3 (the divergence guard gave up) and 5 (the run's last checkpoint could not be written for
lack of space) stop at once, since a relaunch would fail the same way. Any other exit (a killed
rank, a hang ended by the watchdog, a lost node) relaunches the command with ``run.resume=auto``
(replacing any ``run.resume=...`` argument) after a backoff that doubles per restart, up to
``--max-restarts`` restarts; then it gives up with a summary.
SIGTERM/SIGINT to the supervisor are passed to the job, which saves and exits; no restart follows.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional

from .telemetry import get_logger

logger = get_logger("beit3.runtime.supervise")
NO_RESTART = {0: "finished", 2: "configuration error", 3: "diverged",
              5: "the last checkpoint could not be written: no space left"}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="relaunch a failed training job with run.resume=auto")
    ap.add_argument("--max-restarts", type=int, default=3, help="restarts before giving up")
    ap.add_argument("--backoff", type=float, default=10.0, help="seconds before the first restart (doubles)")
    ap.add_argument("--max-backoff", type=float, default=300.0)
    ap.add_argument("--summary", help="write the attempts as JSON here")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the launch command")
    args = ap.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        ap.error("no command: use  python -m beit3.runtime.supervise [options] -- deepspeed ...")
    if args.max_restarts < 0 or args.backoff < 0:
        ap.error("--max-restarts and --backoff must be >= 0")
    return args


def resume_command(command: list[str]) -> list[str]:
    """``command`` with ``run.resume=auto`` instead of any other ``run.resume=...`` (every trainer's
    shared run section, ``runtime.run_config.RunSection``)."""
    return [a for a in command if not a.startswith("run.resume=")] + ["run.resume=auto"]


class _Child:
    """The running job; forwards SIGTERM/SIGINT to its process group."""

    def __init__(self) -> None:
        self.proc: Optional[subprocess.Popen] = None
        self.stopping = False
        self._previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        """Put the caller's handlers back (``main`` called in a process that goes on)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, frame) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signum)

    def run(self, command: list[str]) -> int:
        self.proc = subprocess.Popen(command, start_new_session=True)
        rc = self.proc.wait()
        try:  # leftovers of the job (a rank the launcher did not reap)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        return rc


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    child = _Child()
    try:
        return _supervise(args, child)
    finally:
        child.restore()


def _supervise(args: argparse.Namespace, child: _Child) -> int:
    attempts, command = [], args.command
    while True:
        t0 = time.time()
        logger.info("attempt %d: %s", len(attempts) + 1, " ".join(command))
        rc = child.run(command)
        attempts.append({"attempt": len(attempts) + 1, "exit_code": rc, "seconds": round(time.time() - t0, 1),
                         "start": t0})
        logger.info("attempt %d ended with exit code %d after %.1f s", len(attempts), rc, attempts[-1]["seconds"])
        if rc in NO_RESTART or child.stopping:
            reason = NO_RESTART.get(rc, "stopped by a signal")
            break
        if len(attempts) > args.max_restarts:
            reason = f"gave up after {args.max_restarts} restart(s)"
            break
        delay = min(args.backoff * 2 ** (len(attempts) - 1), args.max_backoff)
        logger.warning("restart %d of %d in %.0f s with run.resume=auto (exit code %d)",
                       len(attempts), args.max_restarts, delay, rc)
        time.sleep(delay)
        command = resume_command(args.command)
    summary = {"outcome": reason, "exit_code": rc, "restarts": len(attempts) - 1, "attempts": attempts}
    logger.info("supervise: %s; %d attempt(s), exit codes %s, %.1f s in all", reason, len(attempts),
                [a["exit_code"] for a in attempts], sum(a["seconds"] for a in attempts))
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump(summary, f, indent=1)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
