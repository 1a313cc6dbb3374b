"""runtime.ports: rendezvous port reservations below the ephemeral range, flock'ed per port."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from beit3.runtime import ports
from beit3.runtime.ports import candidate_range, ephemeral_range, reserve_port


@pytest.fixture(autouse=True)
def private_lock_dir(tmp_path, monkeypatch):
    """Each test's own lock folder (children inherit it through the environment)."""
    monkeypatch.setenv("BEIT3_PORT_LOCK_DIR", str(tmp_path / "locks"))


def test_reserved_port_is_below_the_ephemeral_range_and_bindable():
    lo, _ = ephemeral_range()
    with reserve_port() as port:
        assert port < lo and candidate_range()[0] <= port < candidate_range()[1]
        with socket.socket() as sock:  # the caller (launcher) can bind it
            sock.bind(("127.0.0.1", port))


def test_ephemeral_range_matches_the_kernel():
    path = "/proc/sys/net/ipv4/ip_local_port_range"
    if not os.path.exists(path):
        pytest.skip("no /proc port range")
    assert ephemeral_range() == tuple(int(x) for x in open(path).read().split())


def test_concurrent_reservations_in_one_process_never_share_a_port():
    with reserve_port() as a, reserve_port() as b, reserve_port() as c:
        assert len({a, b, c}) == 3


def _hold_many(n: int, q, hold_s: float) -> None:
    import contextlib

    with contextlib.ExitStack() as stack:
        got = [stack.enter_context(reserve_port()) for _ in range(n)]
        q.put(got)
        time.sleep(hold_s)


@pytest.mark.slow
def test_concurrent_processes_never_get_the_same_port(monkeypatch):
    # a narrow range makes collisions certain if the lock did not work
    monkeypatch.setattr(ports, "candidate_range", lambda: (23000, 23040))
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hold_many, args=(8, q, 2.0)) for _ in range(4)]
    for p in procs:
        p.start()
    got = [q.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    flat = [port for g in got for port in g]
    assert len(flat) == 32 and len(set(flat)) == 32, got


def test_a_bound_port_is_skipped(monkeypatch):
    # two neighbouring free ports below the ephemeral range (the kernel hands out none of them on its own,
    # unlike busy + 1 after a bind to port 0, which another connection of a parallel test may take)
    lo, hi = candidate_range()
    busy = next(p for p in range(lo + random_offset(), hi - 1) if ports._bindable(p) and ports._bindable(p + 1))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", busy))  # make it the only candidate but one
        monkeypatch.setattr(ports, "candidate_range", lambda: (busy, busy + 2))
        with reserve_port() as port:
            assert port == busy + 1


def random_offset() -> int:
    import random

    lo, hi = candidate_range()
    return random.randrange(0, max(1, (hi - lo) // 2))


CHILD = """
import sys, time
from beit3.runtime.ports import acquire_port
port, fd = acquire_port()
print(port, flush=True)
time.sleep(600)
"""


def test_the_lock_is_released_when_the_holder_dies(monkeypatch):
    lo, hi = candidate_range()
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ))
    try:
        port = int(child.stdout.readline())
        monkeypatch.setattr(ports, "candidate_range", lambda: (port, port + 1))
        with pytest.raises(RuntimeError, match="no free port"):
            ports.acquire_port()  # held by the live child
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        with reserve_port() as again:  # the kernel dropped the dead holder's flock
            assert again == port
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_is_reserved_sees_a_reservation_of_this_or_another_process():
    with reserve_port() as port:
        assert ports.is_reserved(port)
        assert ports.is_reserved(port)  # asking does not take or drop the reservation
        held = subprocess.run([sys.executable, "-c", f"from beit3.runtime.ports import is_reserved; print(is_reserved({port}))"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert held == "True"
    assert not ports.is_reserved(port)
    assert not ports.is_reserved(candidate_range()[0] - 1)  # never reserved: no lock file
