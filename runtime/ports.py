"""Rendezvous ports that cannot be stolen between choosing and using them.

``free_port()`` style bind-to-0-and-release hands back a port from the kernel's ephemeral range,
which the kernel may give to any outgoing connection (or another bind to port 0) before the
launcher binds it. ``reserve_port()`` instead picks a port BELOW the ephemeral range (read from
``/proc/sys/net/ipv4/ip_local_port_range``), so the kernel never hands it out on its own, and
coordinates concurrent processes on this machine with an ``fcntl.flock``'ed lock file per port:
the lock is held for the lifetime of the reservation (the ``with`` block) and released by the
kernel when the holder exits or dies. A port currently bound by anyone (locked or not) is skipped.

    with reserve_port() as port:
        run_job([..., "--master_port", str(port), ...])
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Optional

DEFAULT_EPHEMERAL = (32768, 60999)
LOWEST = 20000  # stay clear of well-known/registered service ports commonly in use below this
_held: list[int] = []  # fds of process-lifetime reservations (reserve_port_for_process)


def ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def candidate_range() -> tuple[int, int]:
    """[lo, hi) of the ports reservations come from: just below the ephemeral range."""
    eph_lo, _ = ephemeral_range()
    hi = eph_lo
    lo = max(1024, min(LOWEST, hi - 2000))
    return lo, hi


def lock_dir() -> Path:
    path = Path(os.environ.get("BEIT3_PORT_LOCK_DIR") or Path(tempfile.gettempdir()) / "beit3-ports")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _bindable(port: int, host: str = "127.0.0.1") -> bool:
    """Nobody has ``port`` bound now (SO_REUSEADDR off, so a listener or TIME_WAIT-free bind)."""
    for addr in {host, "0.0.0.0"}:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
            try:
                sock.bind((addr, port))
            except OSError:
                return False
    return True


def _lock_now(fd: int) -> bool:
    """Take ``fd``'s exclusive lock without waiting; False when another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _try_lock(port: int) -> Optional[int]:
    fd = os.open(lock_dir() / f"{port}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        locked = _lock_now(fd)
    except OSError:
        os.close(fd)
        raise
    if not locked:
        os.close(fd)
        return None
    if not _bindable(port):
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def acquire_port(attempts: int = 4000) -> tuple[int, int]:
    """(port, fd of its held lock); close the fd (or exit) to release the reservation."""
    lo, hi = candidate_range()
    ports = list(range(lo, hi))
    random.SystemRandom().shuffle(ports)
    for port in ports[:attempts]:
        fd = _try_lock(port)
        if fd is not None:
            return port, fd
    raise RuntimeError(f"no free port to reserve in [{lo}, {hi}) (lock files in {lock_dir()})")


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


@contextlib.contextmanager
def reserve_port() -> Iterator[int]:
    """A port outside the ephemeral range, reserved against every other ``reserve_port`` caller
    on this machine until the block ends (or this process dies)."""
    port, fd = acquire_port()
    try:
        yield port
    finally:
        release(fd)


def is_reserved(port: int) -> bool:
    """Some process holds ``port``'s reservation now (its lock file is locked)."""
    path = lock_dir() / f"{port}.lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        return not _lock_now(fd)
    finally:
        os.close(fd)  # closing releases a lock taken here


def reserve_port_for_process() -> int:
    """A reserved port held until this process exits (single-process rendezvous)."""
    port, fd = acquire_port()
    _held.append(fd)
    return port


__all__ = ["acquire_port", "candidate_range", "ephemeral_range", "is_reserved", "lock_dir", "release",
           "reserve_port", "reserve_port_for_process"]
