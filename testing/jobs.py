"""Launching real jobs from tests and benches: the tiny pretraining recipe's overrides, the
launcher command (``deepspeed``, or ``torchrun`` where the DeepSpeed launcher is not what is tested),
a bounded job in its own process group, the logged metrics."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from beit3.runtime.ports import reserve_port

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "pretrain" / "train.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
TINY_YAML = REPO / "pretrain" / "configs" / "tiny_demo.yaml"
# the session's demo data (conftest ``demo_data``) and the loss-curve reference are built from these
TEST_DATA_ARGS = dict(num_train=400, spm_vocab=400, samples_per_shard=100, max_docs=80)


def overrides(data, tokenizer: Path, out: Path, **extra) -> list[str]:
    from beit3.data_pipeline import TextTokenizer

    items = {
        "data.image_shards": data.image_shards, "data.text_shards": data.text_shards,
        "data.pair_shards": data.pair_shards, "data.spm_path": data.spm_path,
        "model.overrides.vocab_size": TextTokenizer(data.spm_path).vocab_size,
        "targets.tokenizer_path": str(tokenizer), "run.output_dir": str(out), "run.log_every": 1,
        "run.tensorboard": "false", "data.images": 16, "data.texts": 16, "data.pairs": 16,
        # the tests' recipe, kept apart from the demo's tuning of tiny_demo.yaml (README: demo departures)
        "optim.lr": 1e-3, "optim.total_steps": 400, "data.text_mask.pair_ratio": 0.5,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


LAUNCHERS = ("deepspeed", "torchrun")


# The shared reference run (the conftest's session fixture ``reference_run``): the loss-curve guard
# compares its curve with tests/data/loss_curve.json, the pretraining and guard tests compare their
# runs' losses and checkpoints with it. Saving neither draws random numbers nor changes the data
# order, and the schedule is set by optim.total_steps, so its first steps equal those of shorter runs.
REFERENCE_STEPS = 12
REFERENCE_SAVE_EVERY = 4


def reference_overrides(data, tokenizer: Path, out: Path, **extra) -> list[str]:
    return overrides(data, tokenizer, out, **{"run.max_steps": REFERENCE_STEPS, "run.save_every": REFERENCE_SAVE_EVERY,
                                              "run.keep_last": REFERENCE_STEPS // REFERENCE_SAVE_EVERY,
                                              "run.seed": 0, "optim.warmup_steps": 2, **extra})


def launcher_head(nprocs: int, port: int, launcher: str = "deepspeed") -> list[str]:
    """The start of a one-node launch of ``nprocs`` ranks rendezvousing on ``port``.

    "deepspeed": the documented command; its launcher kills the other ranks when one fails and
    exits with that rank's code (the fault, supervisor and exit-code tests need it). "torchrun":
    the same ranks and environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT) about 6 s
    sooner per launch (one launcher process instead of DeepSpeed's runner + launch, each importing
    DeepSpeed), but any failure exits 1: only for runs expected to succeed."""
    if launcher == "deepspeed":
        return [str(DEEPSPEED), "--num_gpus", str(nprocs), "--master_port", str(port)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    raise ValueError(f"launcher {launcher!r}: one of {LAUNCHERS}")


def launch_cmd(nprocs: int, port: int, args: list[str], ds_config: str = "zero3_bf16.json",
               script: Path = TRAIN, launcher: str = "deepspeed") -> list[str]:
    return [*launcher_head(nprocs, port, launcher), str(script), "--config", str(TINY_YAML),
            "--deepspeed_config", ds_config, *args]


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Job:
    """A launcher command started in its own process group (session), its stdout + stderr in a
    temporary file. ``wait(timeout)`` is bounded: a job still running after ``timeout`` fails the
    test with every process's Python stacks: SIGUSR1 (each rank registers a faulthandler dump on
    it, ``engine.init_distributed``), then SIGKILL to the whole group, so no rank outlives the test."""

    def __init__(self, cmd: list[str], env: dict[str, str]):
        import tempfile

        self.cmd = cmd
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def poll(self):
        return self.proc.poll()

    def output(self) -> str:
        """The output so far, read without moving the file offset the job's processes write at."""
        data, fd = [], self.log.fileno()
        while chunk := os.pread(fd, 1 << 20, sum(map(len, data))):
            data.append(chunk)
        return b"".join(data).decode(errors="replace")

    def groups(self) -> set[int]:
        """The job's process group and those of its descendants in other sessions (a supervisor's
        attempt runs in its own)."""
        import psutil

        pgids = {self.pid}
        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                with contextlib.suppress(OSError):
                    pgids.add(os.getpgid(child.pid))
        except psutil.Error:
            pass
        return pgids

    def kill(self, sig: int = None, groups: set[int] | None = None) -> None:
        """Signal the job's process groups (default SIGKILL; ``groups`` as found earlier, else now) and
        reap the launcher."""
        import signal

        for pgid in groups or self.groups():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL if sig is None else sig)
        if sig is None or sig == signal.SIGKILL:
            self._wait(None)

    def _wait(self, timeout: float | None) -> int:
        return self.proc.wait(timeout=timeout)

    def _quiet(self, quiet_s: float, most_s: float) -> None:
        """Wait until the output has not grown for ``quiet_s`` (at least that, at most ``most_s``)."""
        import time

        end, size, still_since = time.monotonic() + most_s, -1, time.monotonic()
        while time.monotonic() < end:
            now = os.fstat(self.log.fileno()).st_size
            if now != size:
                size, still_since = now, time.monotonic()
            elif time.monotonic() - still_since >= quiet_s:
                return
            time.sleep(0.1)

    def wait(self, timeout: float) -> tuple[int, str]:
        import signal
        import time

        import pytest

        try:
            rc = self._wait(timeout)
        except subprocess.TimeoutExpired:
            groups = self.groups()  # before any process dies and its children leave the tree
            self.kill(signal.SIGUSR1, groups)
            self._quiet(1.0, 5.0)  # the stacks are written
            self.kill(None, groups | self.groups())
            out = self.output()
            self.log.close()
            pytest.fail(f"job still running after {timeout} s, stacks of its processes (SIGUSR1) at the end of "
                        f"its output:\n{out[-30000:]}")
        out = self.output()
        self.log.close()
        return rc, out


class ForkJob(Job):
    """A ``torchrun`` command run by the test fork server (``beit3.testing.forkserver``): its ranks are
    forked from a process that has imported everything once; the same ranks, environment, output and
    exit rule (any failed rank: the others stopped, exit 1). ``pid`` is the job's process group."""

    def __init__(self, parsed: dict, env: dict[str, str]):
        import tempfile

        from beit3.testing import forkserver

        self.cmd, self.rc = parsed["cmd"], None
        self.first_failure: int | None = None  # the exit code of the first rank that failed (DeepSpeed's launcher's)
        self.log = tempfile.TemporaryFile("w+")
        self._port = contextlib.ExitStack()
        port = parsed["master_port"] or self._port.enter_context(reserve_port())  # --standalone
        req = forkserver.job_request(parsed, env, str(REPO), port)
        self.sock, self.pid = forkserver.server_for(env, REPO).start(req, self.log.fileno())

    def _result(self, timeout: float | None) -> int | None:
        import select

        from beit3.testing import forkserver

        if self.rc is None and select.select([self.sock], [], [], timeout)[0]:
            msg, _ = forkserver.recv_msg(self.sock)
            self.rc = -9 if msg is None else msg["rc"]  # no message: the leader was killed
            self.first_failure = None if msg is None else msg["first_failure"]
            self.sock.close()
            self._port.close()
        return self.rc

    def poll(self):
        return self._result(0)

    def _wait(self, timeout: float | None) -> int:
        rc = self._result(timeout)
        if rc is None:
            raise subprocess.TimeoutExpired(self.cmd, timeout)
        return rc


TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def parse_torchrun(cmd: list[str]) -> dict | None:
    """A ``torchrun`` command's one-node launch, or None where it is not one or has an option the fork
    server does not implement (then the real ``torchrun`` runs it)."""
    if cmd[:3] != TORCHRUN:
        return None
    out = {"cmd": cmd, "nprocs": None, "master_addr": "127.0.0.1", "master_port": None, "module": False}
    valued = {"--nproc_per_node": "nprocs", "--nproc-per-node": "nprocs", "--master_addr": "master_addr",
              "--master-addr": "master_addr", "--master_port": "master_port", "--master-port": "master_port"}
    rest = list(cmd[3:])
    standalone = False
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        name, eq, value = opt.partition("=")
        if name in valued:
            out[valued[name]] = value if eq else rest.pop(0)
        elif opt == "--standalone":
            standalone = True
        elif opt in ("-m", "--module"):
            out["module"] = True
        else:
            return None
    if not rest or out["nprocs"] is None or not out["nprocs"].isdigit() or standalone == (out["master_port"] is not None):
        return None
    out["nprocs"] = int(out["nprocs"])
    out["master_port"] = None if standalone else int(out["master_port"])
    out["target"], out["argv"] = rest[0], rest[1:]
    return out


def use_fork_server(env: dict[str, str]) -> bool:
    from beit3.testing.forkserver import DISABLE_ENV

    return env.get("DS_ACCELERATOR") == "cpu" and env.get(DISABLE_ENV, "1") != "0"


SUPERVISE = [sys.executable, "-m", "beit3.runtime.supervise"]


def supervised_on_fork_server(cmd: list[str], env: dict[str, str]) -> list[str]:
    """``cmd`` with the child of a supervisor (``SUPERVISE ... -- CHILD``) run on the fork server when the
    child is a ``torchrun`` command it runs: ``python -m beit3.testing.forkserver launch SOCKET -- CHILD``,
    one real process per attempt that the supervisor starts, signals and reads the exit code of.
    Any other command is returned as it is."""
    from beit3.testing import forkserver

    if cmd[:3] != SUPERVISE or "--" not in cmd:
        return cmd
    cut = cmd.index("--") + 1
    if parse_torchrun(cmd[cut:]) is None:
        return cmd
    server = forkserver.server_for(env, REPO)
    return [*cmd[:cut], sys.executable, "-m", "beit3.testing.forkserver", "launch", server.path, "--", *cmd[cut:]]


def start(cmd: list[str], env: dict[str, str]) -> Job:
    """A launcher command as a bounded job: in the CPU tier, a ``torchrun`` command on the fork server
    (``ForkJob``) and a supervised ``torchrun`` command with its attempts there
    (``supervised_on_fork_server``); anything else (``deepspeed``, a script) as real processes."""
    if not use_fork_server(env):
        return Job(cmd, env)
    parsed = parse_torchrun(cmd)
    return ForkJob(parsed, env) if parsed else Job(supervised_on_fork_server(cmd, env), env)


def run_job(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run a launcher command in its own process group, bounded (``Job.wait``); (exit code, stdout + stderr)."""
    return start(cmd, env).wait(timeout)


def launch(nprocs: int, args: list[str], ds_config: str = "zero3_bf16.json", timeout: int = 600,
           script: Path = TRAIN, env: dict[str, str] | None = None, launcher: str = "torchrun") -> str:
    """A run that must succeed (exit 0); its output."""
    with reserve_port() as port:  # held until the job ended: no other launch can take it
        cmd = launch_cmd(nprocs, port, args, ds_config, script, launcher)
        rc, out = run_job(cmd, {**run_env(), **(env or {})}, timeout)
    assert rc == 0, out[-6000:]
    return out


def metrics(out_dir: Path) -> dict[int, dict]:
    """Last logged metrics per step (a resumed run re-logs steps after its checkpoint)."""
    rows = {}
    path = Path(out_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return rows
