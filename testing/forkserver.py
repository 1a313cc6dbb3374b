"""A fork server for the CPU tier's ``torchrun`` launches: ranks forked from a process that has
already imported torch, DeepSpeed and the trainers, instead of a launcher and fresh interpreters.

A 2-rank tiny launch under ``torchrun`` spends most of its time importing: the launcher (~1 s),
each rank's imports (~2 s) and the modules DeepSpeed imports lazily in ``deepspeed.initialize``
(``torch._dynamo``, inductor's templates, the Muon optimizer's compiled kernels: ~1 s per rank),
then the interpreter's teardown (~1 s). Here one server per pytest process imports all of that
once; each job is a leader process forked from it, in its own session, which forks the ranks.

What a rank sees is what ``torchrun`` gives it: ``sys.argv``, ``sys.path[0]`` (the script's folder),
the job's environment plus torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT, ...)
except four of its elastic agent's: TORCHELASTIC_USE_AGENT_STORE (so rank 0 hosts the rendezvous
store, as under the ``deepspeed`` launcher), the run id, the error file and the list of signals
the agent forwards; fresh random seeds (Python, NumPy, torch), the
default signal handlers, stdout and stderr on the job's log. A rank ends as a forked
``multiprocessing`` child does: non-daemon threads joined, ``atexit`` handlers run, streams
flushed, ``os._exit`` (no module teardown). The leader follows ``torchrun``'s exit rule: when a
rank fails, the others get SIGTERM (SIGKILL 10 s later) and the job exits 1; 0 when all did. It
also reports the first failed rank's exit code (what DeepSpeed's launcher exits with). SIGTERM and
SIGINT to the leader are passed on to the ranks, as ``torchrun`` does.

Used only where it cannot change what a test proves (``beit3.testing.jobs.start``): a ``torchrun``
command whose options it parses completely, in the CPU tier (``DS_ACCELERATOR=cpu``: nothing
initialises CUDA before a fork), unless ``BEIT3_FORK_SERVER=0``; the supervisor's attempts when
they are such commands (``launch``: each attempt one process that the supervisor starts, signals
and reads the exit code of). The ``deepspeed`` launcher, whose behaviour the fault tests check,
always starts real processes. Variables
starting with ``BEIT3_`` or ``PYTEST_`` are read when a job runs, not at import; any other difference between a
job's environment and a server's starts another server (import-time settings such as
``TRITON_INTERPRET`` or ``OMP_NUM_THREADS`` are honoured).
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

PRELOAD = ("torch", "numpy", "deepspeed", "deepspeed.runtime.zero.stage3", "torch._dynamo",
           "torch._inductor.select_algorithm", "deepspeed.runtime.zero.muon.muon_optimizer",
           "beit3.pretrain.train", "beit3.pretrain.train_vqkd", "beit3.pretrain.targets", "beit3.finetune.train")
# read at run time (the trainers' BEIT3_*, pytest's PYTEST_CURRENT_TEST), never at import: may differ per job
JOB_ENV_PREFIXES = ("BEIT3_", "PYTEST_")
DISABLE_ENV = "BEIT3_FORK_SERVER"
TERM_GRACE_S = 10.0


# ---- framing: one length-prefixed JSON message, optionally carrying file descriptors ----------

def send_msg(sock: socket.socket, obj, fds: tuple[int, ...] = ()) -> None:
    data = json.dumps(obj).encode()
    frame = struct.pack("!I", len(data)) + data
    if fds:
        socket.send_fds(sock, [frame], list(fds))
    else:
        sock.sendall(frame)


def _recv_exact(sock: socket.socket, size: int, start: bytes = b"") -> Optional[bytes]:
    """``size`` bytes (``start`` already read), or None if the stream ends first."""
    data = start
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def recv_msg(sock: socket.socket, max_fds: int = 0):
    """(message, fds); (None, fds) at end of stream."""
    first, fds, _, _ = socket.recv_fds(sock, 4, max_fds) if max_fds else (sock.recv(4), [], 0, None)
    head = _recv_exact(sock, 4, first) if first else None
    data = _recv_exact(sock, struct.unpack("!I", head)[0]) if head else None
    return (None if data is None else json.loads(data)), fds


# ---- the server side ----------------------------------------------------------------------------

def _die_with_parent() -> None:
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _rank(req: dict, rank: int, log_fd: int) -> None:
    """In a forked rank: become the rank ``torchrun`` would start; never returns."""
    code = 1
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a fresh interpreter's: KeyboardInterrupt
        n = req["nprocs"]
        os.environ.clear()
        os.environ.update(req["env"])
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
                           "LOCAL_WORLD_SIZE": str(n), "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1",
                           "ROLE_NAME": "default", "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(n),
                           "MASTER_ADDR": req["master_addr"], "MASTER_PORT": str(req["master_port"]),
                           "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
                           "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"})
        os.chdir(req["cwd"])
        code = _run_target(req)
    except BaseException:  # noqa: BLE001 - the rank's failure goes to its log, as a fresh interpreter's would
        import traceback

        traceback.print_exc()
    _exit(code)


def _run_target(req: dict) -> int:
    import random
    import runpy

    import numpy as np
    import torch

    random.seed()
    np.random.seed()
    torch.seed()
    target = req["target"]
    sys.argv = [target, *req["argv"]]
    try:
        if req["module"]:
            sys.path[0] = req["cwd"]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.path[0] = str(Path(target).resolve().parent)
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0


def _exit(code: int) -> None:
    import atexit
    import threading

    try:
        threading._shutdown()  # what interpreter exit does first: join the non-daemon threads
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _lead(conn: socket.socket, req: dict, log_fd: int) -> None:
    """The job's leader, in its own session (the job's process group); never returns."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the stacks asked for are the ranks'
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    send_msg(conn, {"pgid": os.getpid()})
    ranks: dict[int, int] = {}
    signalled = []

    def forward(signum: int, frame) -> None:  # as torchrun: pass SIGTERM/SIGINT on to the ranks, then exit 1
        signalled.append(signum)
        for pid in list(ranks):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT):  # a rank resets both (``_rank``)
        signal.signal(sig, forward)
    for r in range(req["nprocs"]):
        pid = os.fork()
        if pid == 0:
            conn.close()
            _rank(req, r, log_fd)
        ranks[pid] = r
    os.close(log_fd)
    codes, first = _watch(conn, ranks)
    send_msg(conn, {"rc": 0 if all(c == 0 for c in codes) and not signalled else 1, "ranks": codes,
                    "first_failure": first})
    os._exit(0)


def _watch(conn: socket.socket, ranks: dict[int, int]) -> tuple[list[Optional[int]], Optional[int]]:
    """Wait for the ranks; on the first failure stop the others (SIGTERM, then SIGKILL); if the
    client goes away, kill the whole job. The ranks' exit codes, and that of the first rank that
    failed (what DeepSpeed's launcher would exit with), None when none did."""
    codes: list[Optional[int]] = [None] * len(ranks)
    stop_at, first = None, None
    while any(c is None for c in codes):
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            code = os.waitstatus_to_exitcode(status)
            codes[ranks[pid]] = code
            if code != 0 and stop_at is None:
                first, stop_at = code, time.monotonic() + TERM_GRACE_S
                _signal_alive(ranks, codes, signal.SIGTERM)
            continue
        if stop_at is not None and time.monotonic() > stop_at:
            _signal_alive(ranks, codes, signal.SIGKILL)
            stop_at = float("inf")
        readable, _, _ = select.select([conn], [], [], 0.05)
        if readable and not conn.recv(1):  # the test (client) is gone: nothing may outlive it
            os.killpg(0, signal.SIGKILL)
    return codes, first


def _signal_alive(ranks: dict[int, int], codes: list, sig: int) -> None:
    for pid, r in ranks.items():
        if codes[r] is None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def serve(path: str) -> None:
    import importlib

    _die_with_parent()
    for name in PRELOAD:
        importlib.import_module(name)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # leaders are reaped by the kernel
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        req, fds = recv_msg(conn, max_fds=1)
        if req is None or len(fds) != 1:
            conn.close()
            continue
        if os.fork() == 0:
            srv.close()
            _lead(conn, req, fds[0])
        conn.close()
        os.close(fds[0])


# ---- the client side ----------------------------------------------------------------------------

class Server:
    """One fork server, started with ``env`` (the import-time environment)."""

    def __init__(self, env: dict[str, str], cwd: Path):
        self.dir = tempfile.mkdtemp(prefix="beit3-fork-")
        self.path = os.path.join(self.dir, "sock")
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "beit3.testing.forkserver", "serve", self.path], cwd=cwd,
                                     env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"fork server did not start (exit {self.proc.wait()})")

    def start(self, req: dict, log_fd: int) -> tuple[socket.socket, int]:
        return submit(self.path, req, log_fd)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


_servers: dict[frozenset, Server] = {}  # closed at exit (and they die with this process: PR_SET_PDEATHSIG)
MAX_SERVERS = 2


def import_env(env: dict[str, str]) -> frozenset:
    return frozenset((k, v) for k, v in env.items() if not k.startswith(JOB_ENV_PREFIXES))


def server_for(env: dict[str, str], cwd: Path) -> Server:
    key = import_env(env)
    if not _servers:
        import atexit

        atexit.register(close_all)
    if key not in _servers:
        while len(_servers) >= MAX_SERVERS:
            _servers.pop(next(iter(_servers))).close()
        _servers[key] = Server(dict(key), cwd)
    return _servers[key]


def close_all() -> None:
    while _servers:
        _servers.popitem()[1].close()


# ---- one job as one process: the command a supervisor runs ---------------------------------------

def submit(path: str, req: dict, log_fd: int) -> tuple[socket.socket, int]:
    """Start a job on the server at ``path``, its ranks writing to ``log_fd``: (the socket its result comes
    on, the job's process group). RuntimeError when the server refuses it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        send_msg(sock, req, (log_fd,))
        first, _ = recv_msg(sock)
    except BaseException:
        sock.close()
        raise
    if first is None:
        sock.close()
        raise RuntimeError(f"fork server refused the job: {req['target']} {req['argv']}")
    return sock, first["pgid"]


def job_request(parsed: dict, env: dict[str, str], cwd: str, port: int) -> dict:
    """The server's request for a parsed ``torchrun`` command (``beit3.testing.jobs.parse_torchrun``)."""
    return {"nprocs": parsed["nprocs"], "target": parsed["target"], "module": parsed["module"],
            "argv": parsed["argv"], "env": env, "cwd": cwd, "master_addr": parsed["master_addr"], "master_port": port}


def launch(path: str, cmd: list[str]) -> int:
    """Run the ``torchrun`` command ``cmd`` on the server at ``path`` as this one process, as the real
    ``torchrun`` would run it: the ranks write to this process's stdout, SIGTERM and SIGINT are passed
    to them (through the leader), SIGUSR1 asks them for their stacks, and the exit code is the job's
    (``torchrun``'s rule). If this process dies, its job dies with it (the leader watches the socket).
    For a supervisor's child (``beit3.testing.jobs.start``); the environment is this process's."""
    import contextlib

    from beit3.runtime.ports import reserve_port
    from beit3.testing.jobs import parse_torchrun

    parsed = parse_torchrun(cmd)
    if parsed is None:
        print(f"forkserver launch: not a torchrun command it runs: {cmd}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        port = parsed["master_port"] or stack.enter_context(reserve_port())  # --standalone
        try:
            sock, leader = submit(path, job_request(parsed, dict(os.environ), os.getcwd(), port), sys.stdout.fileno())
        except RuntimeError as e:
            print(f"forkserver launch: {e}", file=sys.stderr)
            return 1
        stack.enter_context(sock)

        def forward(signum: int, frame) -> None:
            try:  # the stacks are the ranks' (the leader ignores SIGUSR1); a stop goes through the leader
                os.killpg(leader, signum) if signum == signal.SIGUSR1 else os.kill(leader, signum)
            except ProcessLookupError:
                pass

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(sig, forward)
        done, _ = recv_msg(sock)
        return 128 + signal.SIGKILL if done is None else done["rc"]


def main(argv: list[str]) -> int:
    """``serve PATH`` (the server, started by ``Server``) or ``launch PATH -- TORCHRUN_COMMAND``."""
    if argv[:1] == ["serve"] and len(argv) == 2:
        serve(argv[1])
    if argv[:1] == ["launch"] and len(argv) > 3 and argv[2] == "--":
        return launch(argv[1], argv[3:])
    print("usage: python -m beit3.testing.forkserver serve PATH | launch PATH -- TORCHRUN_COMMAND", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
