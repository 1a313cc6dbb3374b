"""Flake hunt: run pytest node ids N times each, each run ``pytest -x -q NODEID`` in its own
subprocess (own session, bounded by ``--timeout``), and print a markdown table of failures by kind.

    python -m bench.flakes                          # every test marked `distributed`, 20 runs each
    python -m bench.flakes --runs 5 --hog -k finetune_distributed
    python bench/flakes.py tests/test_finetune_distributed.py --runs 20
    python -m bench.flakes --suite --runs 20        # the tier N times as `make test` runs it (2 xdist workers)

``--suite``: each run is one ``pytest -n 2 --dist loadfile --no-loadscope-reorder -m MARKER`` of the
selected tests, as ``make test`` runs them (two modules at a time: every test shares the 2 cores with
another module's tests; session fixtures rebuilt per run); outcomes per test from its JUnit XML.

Failure kinds (from the exit status and the output): timeout, SIGABRT, assertion, other.
``--hog`` runs a busy-looping process on one core for the whole hunt (scheduling pressure).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
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


def bounded(cmd: list[str], timeout: float, env: dict[str, str]) -> tuple[int | None, str]:
    """(exit code, or None after a timeout: stacks asked for with SIGUSR1, then SIGKILL; the output)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
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
        return rc, log.read()


def run_once(nodeid: str, timeout: float, env: dict[str, str]) -> tuple[str | None, float, str]:
    start = time.time()
    rc, out = bounded([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", nodeid], timeout, env)
    return classify(rc, out), time.time() - start, out


def run_suite_once(marker: str, keyword: str | None, nodeids: list[str], timeout: float, env: dict[str, str],
                   workers: int) -> tuple[dict[str, tuple[str | None, float]], str | None, float, str]:
    """One xdist run of the selected tests: ({nodeid: (failure kind or None, seconds)}, the run's own
    failure kind (a timeout, or a run that reported nothing), its seconds, its output)."""
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers), "--dist", "loadfile",
               "--no-loadscope-reorder", "-m", marker, f"--junitxml={xml}", *(["-k", keyword] if keyword else []),
               *nodeids]
        start = time.time()
        rc, out = bounded(cmd, timeout, env)
        seconds = time.time() - start
        if rc is None or not os.path.exists(xml):
            return {}, classify(rc, out) or "other", seconds, out
        results = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            nodeid = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
            bad = [c for c in case if c.tag in ("failure", "error")]
            if any(c.tag == "skipped" for c in case):
                continue
            text = "\n".join((c.get("message") or "") + (c.text or "") for c in bad)
            results[nodeid] = (classify(1, text) if bad else None, float(case.get("time", 0)))
    return results, None, seconds, out


def _hog() -> None:  # pragma: no cover - busy loop in a child
    os.nice(0)
    while True:
        pass


def _keep_log(logs: Path | None, name: str, out: str) -> None:
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
        (logs / f"{''.join(c if c.isalnum() else '_' for c in name)[-100:]}.log").write_text(out)


def hunt_each(args, nodeids: list[str], env: dict[str, str]) -> list[tuple]:
    """Each test ``args.runs`` times, each run its own pytest process."""
    rows = []
    for nodeid in nodeids:
        kinds = {k: 0 for k in KINDS}
        durations = []
        for i in range(args.runs):
            kind, dt, out = run_once(nodeid, args.timeout, env)
            durations.append(dt)
            if kind:
                kinds[kind] += 1
                _keep_log(args.logs, f"{nodeid}_run{i}_{kind}", out)
            print(f"[{nodeid}] run {i + 1}/{args.runs}: {kind or 'pass'} ({dt:.1f} s)", file=sys.stderr, flush=True)
        rows.append((nodeid, args.runs, sum(kinds.values()), kinds, max(durations)))
    return rows


def hunt_suite(args, env: dict[str, str]) -> list[tuple]:
    """The selected tests ``args.runs`` times as one xdist run each (``--suite``); a run that fails as a
    whole (a timeout, nothing reported) is its own row."""
    per_test: dict[str, list] = {}
    whole = {k: 0 for k in KINDS}
    rows: list[tuple] = []
    for i in range(args.runs):
        results, failed, seconds, out = run_suite_once(args.marker, args.keyword, args.nodeids, args.timeout, env,
                                                       args.workers)
        if failed:
            whole[failed] += 1
            _keep_log(args.logs, f"suite_run{i}_{failed}", out)
        for nodeid, (kind, dt) in results.items():
            row = per_test.setdefault(nodeid, [0, {k: 0 for k in KINDS}, 0.0])
            row[0] += 1
            row[2] = max(row[2], dt)
            if kind:
                row[1][kind] += 1
                _keep_log(args.logs, f"{nodeid}_run{i}_{kind}", out)
        bad = sum(1 for kind, _ in results.values() if kind)
        pytest_s = re.findall(r" in ([0-9.]+)s", out)
        print(f"suite run {i + 1}/{args.runs}: {len(results)} tests, {bad} failed{', ' + failed if failed else ''} "
              f"({seconds:.1f} s wall, pytest: {pytest_s[-1] if pytest_s else '?'} s)", file=sys.stderr, flush=True)
        rows = [(n, r[0], sum(r[1].values()), r[1], r[2]) for n, r in sorted(per_test.items())]
        if any(whole.values()):
            rows.append(("(whole run)", i + 1, sum(whole.values()), whole, float("nan")))
        if args.out:  # a hunt stopped early keeps its table
            args.out.write_text(table(args, rows, i + 1))
    return rows


def table(args, rows: list[tuple], done: int) -> str:
    mode = f"suite (-n {args.workers})" if args.suite else "each test in its own process"
    lines = [f"runs per test: {done} of {args.runs}; {mode}; hog: {'yes' if args.hog else 'no'}; "
             f"timeout {args.timeout:g} s", "", "| test | runs | failures | failure kinds | slowest run (s) |",
             "|---|---|---|---|---|"]
    for nodeid, runs, fails, kinds, slow in rows:
        text = ", ".join(f"{k} {v}" for k, v in kinds.items() if v) or "-"
        lines.append(f"| `{nodeid}` | {runs} | {fails} | {text} | {slow:.1f} |")
    lines += ["", f"{len(rows)} rows, {sum(r[1] for r in rows)} test runs, {sum(r[2] for r in rows)} failures"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("nodeids", nargs="*", help="pytest node ids (default: every test marked -m MARKER)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--suite", action="store_true", help="each run: the selected tests in one xdist run (make test's)")
    ap.add_argument("--workers", type=int, default=2, help="xdist workers of a --suite run")
    ap.add_argument("--hog", action="store_true", help="a CPU hog busy-looping on one core during the hunt")
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k filter on the collected tests")
    ap.add_argument("-m", dest="marker", default="distributed")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it counts as a timeout")
    ap.add_argument("--logs", type=Path, default=None, help="keep the output of failed runs in this folder")
    ap.add_argument("--out", type=Path, default=None, help="--suite: rewrite the table here after every run")
    args = ap.parse_args(argv)

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    if not args.suite:
        nodeids = args.nodeids or collect(args.marker, args.keyword)
        if args.nodeids and args.keyword:
            nodeids = [n for n in nodeids if args.keyword in n]
        if not nodeids:
            print("no tests selected", file=sys.stderr)
            return 2
    hog = None
    if args.hog:
        hog = mp.get_context("fork").Process(target=_hog, daemon=True)
        hog.start()
    try:
        rows = hunt_suite(args, env) if args.suite else hunt_each(args, nodeids, env)
    finally:
        if hog is not None:
            hog.kill()
            hog.join()
    print("\n" + table(args, rows, args.runs), end="")
    return 1 if any(r[2] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
