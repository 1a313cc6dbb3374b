"""Flake hunt: run pytest node ids N times each, each run ``pytest -x -q NODEID`` in its own
subprocess (own session, bounded by ``--timeout``), and print a markdown table of failures by kind.

    python -m bench.flakes                          # every test marked `distributed`, 20 runs each
    python -m bench.flakes --runs 5 --hog -k finetune_distributed
    python bench/flakes.py tests/test_finetune_distributed.py --runs 20

Failure kinds (from the exit status and the output): timeout, SIGABRT, assertion, other.
``--hog`` runs a busy-looping process on one core for the whole hunt (scheduling pressure).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KINDS = ("timeout", "SIGABRT", "assertion", "other")


def collect(marker: str, keyword: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marker]
    if keyword:
        cmd += ["-k", keyword]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines() if "::" in line and not line.startswith(" ")]


def classify(rc: int | None, out: str) -> str | None:
    """None when the run passed; else one of KINDS."""
    if rc is None:
        return "timeout"
    if rc == 0:
        return None
    if (rc in (-signal.SIGABRT, 128 + signal.SIGABRT) or "SIGABRT" in out or "Signals.SIGABRT" in out
            or "terminate called" in out or "signal 6" in out):
        return "SIGABRT"
    if "still running after" in out or "Timeout" in out and "timed out" in out:
        return "timeout"
    if "AssertionError" in out or "\nE   assert" in out or "E       assert" in out:
        return "assertion"
    return "other"


def run_once(nodeid: str, timeout: float, env: dict[str, str]) -> tuple[str | None, float, str]:
    start = time.time()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", nodeid],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGUSR1)
            time.sleep(3)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
        log.seek(0)
        out = log.read()
    return classify(rc, out), time.time() - start, out


def _hog() -> None:  # pragma: no cover - busy loop in a child
    os.nice(0)
    while True:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("nodeids", nargs="*", help="pytest node ids (default: every test marked -m MARKER)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--hog", action="store_true", help="a CPU hog busy-looping on one core during the hunt")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k filter on the collected tests")
    ap.add_argument("-m", dest="marker", default="distributed")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it counts as a timeout")
    ap.add_argument("--logs", type=Path, default=None, help="keep the output of failed runs in this folder")
    args = ap.parse_args(argv)

    nodeids = args.nodeids or collect(args.marker, args.keyword)
    if args.nodeids and args.keyword:
        nodeids = [n for n in nodeids if args.keyword in n]
    if not nodeids:
        print("no tests selected", file=sys.stderr)
        return 2
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    hog = None
    if args.hog:
        hog = mp.get_context("fork").Process(target=_hog, daemon=True)
        hog.start()
    rows = []
    try:
        for nodeid in nodeids:
            kinds = {k: 0 for k in KINDS}
            durations = []
            for i in range(args.runs):
                kind, dt, out = run_once(nodeid, args.timeout, env)
                durations.append(dt)
                if kind:
                    kinds[kind] += 1
                    if args.logs:
                        args.logs.mkdir(parents=True, exist_ok=True)
                        safe = "".join(c if c.isalnum() else "_" for c in nodeid)[-80:]
                        (args.logs / f"{safe}_run{i}_{kind}.log").write_text(out)
                print(f"[{nodeid}] run {i + 1}/{args.runs}: {kind or 'pass'} ({dt:.1f} s)", file=sys.stderr,
                      flush=True)
            rows.append((nodeid, args.runs, sum(kinds.values()), kinds, max(durations)))
    finally:
        if hog is not None:
            hog.kill()
            hog.join()
    print(f"\nruns per test: {args.runs}; hog: {'yes' if args.hog else 'no'}; timeout {args.timeout:g} s\n")
    print("| test | runs | failures | failure kinds | slowest run (s) |")
    print("|---|---|---|---|---|")
    for nodeid, runs, fails, kinds, slow in rows:
        text = ", ".join(f"{k} {v}" for k, v in kinds.items() if v) or "-"
        print(f"| `{nodeid}` | {runs} | {fails} | {text} | {slow:.1f} |")
    return 1 if any(r[2] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
