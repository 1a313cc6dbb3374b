"""The test fork server (``beit3.testing.forkserver``) gives a rank what ``torchrun`` gives it.

A worker script reports what it sees (environment, argv, sys.path[0], cwd, seeds, signal
handlers, the rank tag of the project logger); the same command runs under the real ``torchrun``
and under the fork server, and the reports must agree. Exit codes follow ``torchrun``'s rule.
"""
import json
import os
import sys
import time

import pytest

from beit3.runtime.ports import reserve_port
from beit3.testing import forkserver
from beit3.testing.jobs import (SUPERVISE, TORCHRUN, ForkJob, Job, parse_torchrun, run_env, run_job, start,
                                supervised_on_fork_server)

WORKER = r'''
import json, os, random, signal, sys, time
import numpy as np
import torch
from beit3.runtime.telemetry import get_logger

out, mode = sys.argv[1], sys.argv[2]
if "run.resume=auto" in sys.argv:  # a supervisor's relaunch succeeds
    mode = "ok"
rank = int(os.environ["RANK"])
get_logger("beit3.probe").info("hello from the logger")
get_logger("beit3.probe").warning("warned")
report = {"env": dict(os.environ), "argv": sys.argv[1:], "path0": sys.path[0],
          "cwd": os.getcwd(), "main": __name__, "file": os.path.basename(__file__),
          "seeds": [random.random(), float(np.random.rand()), torch.initial_seed()],
          "handlers": {s: str(signal.getsignal(getattr(signal, s))) for s in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGCHLD")}}
with open(os.path.join(out, f"{rank}.tmp"), "w") as fh:
    json.dump(report, fh)
os.replace(os.path.join(out, f"{rank}.tmp"), os.path.join(out, f"{rank}.json"))
print(f"rank {rank} done", flush=True)
if mode == "fail" and rank == 1:
    for _ in range(600):  # rank 0 has written its report before rank 1 fails (it is stopped then)
        if os.path.exists(os.path.join(out, "0.json")):
            break
        time.sleep(0.1)
    sys.exit(3)
if mode == "fail":
    time.sleep(120)  # must be stopped by the launcher when rank 1 fails
'''


# differ per job by design; only torchrun's elastic agent sets these (forkserver's docstring)
PER_JOB = {"MASTER_ADDR", "MASTER_PORT", "BEIT3_PROBE", forkserver.DISABLE_ENV, "PYTEST_CURRENT_TEST"}
AGENT_ONLY = {"TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE",
              "TORCHELASTIC_SIGNALS_TO_HANDLE"}


def test_torchrun_commands_are_parsed_or_left_to_torchrun():
    head = [*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", "2345"]
    got = parse_torchrun([*head, "train.py", "--config", "a.yaml"])
    assert (got["nprocs"], got["master_port"], got["target"], got["argv"], got["module"]) == \
        (2, 2345, "train.py", ["--config", "a.yaml"], False)
    got = parse_torchrun([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "beit3.pretrain.train_vqkd", "x=1"])
    assert (got["nprocs"], got["master_port"], got["target"], got["argv"], got["module"]) == \
        (2, None, "beit3.pretrain.train_vqkd", ["x=1"], True)
    for unsupported in ([*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "2", "t.py"],  # unknown option
                        [*TORCHRUN, "--nproc_per_node", "auto", "--standalone", "t.py"],  # not a number
                        [*TORCHRUN, "--nproc_per_node", "2", "t.py"],  # neither a port nor --standalone
                        [*TORCHRUN, "--nproc_per_node", "2", "--standalone"],  # no target
                        ["deepspeed", "--num_gpus", "2", "t.py"]):
        assert parse_torchrun(unsupported) is None, unsupported
        supervised = [*SUPERVISE, "--backoff", "0", "--", *unsupported]
        assert supervised_on_fork_server(supervised, run_env()) == supervised  # its child stays a real launch


def test_gpu_tier_and_opt_out_run_the_real_torchrun():
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=1", "-c"]  # never started: only the choice is checked
    assert parse_torchrun(cmd) is None  # "-c" is not an option the server implements
    assert not forkserver.import_env({"BEIT3_X": "1", "PYTEST_CURRENT_TEST": "t"})
    from beit3.testing.jobs import use_fork_server

    assert use_fork_server({"DS_ACCELERATOR": "cpu"})
    assert not use_fork_server({})  # the GPU tier: DeepSpeed picks CUDA; nothing may initialise it before a fork
    assert not use_fork_server({"DS_ACCELERATOR": "cpu", forkserver.DISABLE_ENV: "0"})


def _gone(pgid: int, seconds: float) -> bool:
    """No process of group ``pgid`` is left within ``seconds`` (a killed rank is a zombie until reaped)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _run_worker(tmp_path, name: str, mode: str, fork: bool):
    out = tmp_path / name
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**run_env(), "BEIT3_PROBE": name, forkserver.DISABLE_ENV: "1" if fork else "0"}
    with reserve_port() as port:
        cmd = [*TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(script), str(out), mode]
        job = start(cmd, env)
        assert isinstance(job, ForkJob) == fork
        began = time.monotonic()
        rc, text = job.wait(180)
    reports = [json.loads((out / f"{r}.json").read_text()) for r in (0, 1)]
    return rc, text, reports, time.monotonic() - began, job


@pytest.mark.distributed
def test_a_forked_rank_sees_what_torchrun_gives_it(tmp_path):
    _, _, real, _, _ = _run_worker(tmp_path, "real", "ok", fork=False)
    rc, text, forked, _, _ = _run_worker(tmp_path, "forked", "ok", fork=True)
    assert rc == 0, text
    for r in (0, 1):
        a, b = real[r], forked[r]
        for key in ("main", "file", "path0", "cwd", "handlers"):
            assert a[key] == b[key], (key, a[key], b[key])
        assert a["argv"][1:] == b["argv"][1:]
        env_a = {k: v for k, v in a["env"].items() if k not in PER_JOB}
        env_b = {k: v for k, v in b["env"].items() if k not in PER_JOB}
        assert set(env_a) - set(env_b) == AGENT_ONLY and not set(env_b) - set(env_a)
        assert {k: v for k, v in env_a.items() if k not in AGENT_ONLY} == env_b
        assert env_b["RANK"] == str(r) and b["env"]["BEIT3_PROBE"] == "forked"
    # fresh seeds, as fresh interpreters have: no two ranks (or jobs) share a random stream
    assert forked[0]["seeds"] != forked[1]["seeds"] and forked[0]["seeds"] != real[0]["seeds"]
    # the logger made at import in the server tags each rank's lines with its own rank, INFO only on rank 0
    assert text.count("hello from the logger") == 1 and "[rank0] beit3.probe: hello" in text
    assert "[rank1] beit3.probe: warned" in text and "[rank0] beit3.probe: warned" in text
    assert "rank 0 done" in text and "rank 1 done" in text


@pytest.mark.distributed
def test_a_failed_rank_stops_the_others_and_the_job_exits_1(tmp_path):
    rc_real, _, _, _, _ = _run_worker(tmp_path, "real", "fail", fork=False)
    rc, text, _, seconds, job = _run_worker(tmp_path, "forked", "fail", fork=True)
    assert rc == rc_real == 1, text
    assert job.first_failure == 3  # rank 1's code: what DeepSpeed's launcher would exit with
    assert seconds < 60  # rank 0's 120 s sleep was cut short (SIGTERM)


@pytest.mark.distributed
def test_a_job_past_its_timeout_fails_with_its_stacks_and_leaves_nothing_running(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import faulthandler, os, signal, sys, time\nfaulthandler.register(signal.SIGUSR1)\n"
                      "os.write(1, b'up\\n')\ntime.sleep(600)\n")  # one write: print's pieces of two ranks interleave
    env = {**run_env(), forkserver.DISABLE_ENV: "1"}
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", str(script)]
    job = start(cmd, env)
    assert isinstance(job, ForkJob)
    with pytest.raises(pytest.fail.Exception, match="still running after 3 s") as failed:
        job.wait(3)
    assert "up\nup\n" in str(failed.value) and str(failed.value).count("hang.py") >= 2  # both ranks' stacks
    assert _gone(job.pid, 20), "a process of the job outlived its timeout"  # the leader and both ranks


@pytest.mark.distributed
def test_a_killed_client_takes_its_job_with_it(tmp_path):
    """The fork server's job must not outlive the test that started it (its leader watches the client)."""
    script = tmp_path / "client.py"
    script.write_text(
        "import sys, time\nfrom beit3.testing.jobs import TORCHRUN, start, run_env\n"
        f"job = start([*TORCHRUN, '--standalone', '--nproc_per_node=2', {str(tmp_path / 'w.py')!r}], run_env())\n"
        "print(job.pid, flush=True)\ntime.sleep(600)\n")
    (tmp_path / "w.py").write_text("import time\ntime.sleep(600)\n")
    import subprocess

    client = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**run_env(), forkserver.DISABLE_ENV: "1"})
    pgid = int(client.stdout.readline())
    assert not _gone(pgid, 0)  # the job is running
    client.kill()
    client.wait()
    if not _gone(pgid, 20):
        os.killpg(pgid, 9)
        pytest.fail("the job outlived its client")


def _supervised(tmp_path, name: str, script_args: list[str], max_restarts: int = 1):
    summary = tmp_path / f"{name}.json"
    env = {**run_env(), forkserver.DISABLE_ENV: "1"}
    cmd = [*SUPERVISE, "--max-restarts", str(max_restarts), "--backoff", "0", "--summary", str(summary), "--",
           *TORCHRUN, "--standalone", "--nproc_per_node=2", *script_args]
    job = start(cmd, env)
    assert type(job) is Job and job.cmd[:job.cmd.index("--") + 1] == cmd[:cmd.index("--") + 1]
    assert job.cmd[job.cmd.index("--") + 1:][:4] == [sys.executable, "-m", "beit3.testing.forkserver", "launch"]
    assert job.cmd[-len(script_args) - 3:] == cmd[-len(script_args) - 3:]  # the torchrun command, unchanged
    return job, summary


@pytest.mark.distributed
def test_a_supervised_torchrun_job_runs_its_attempts_on_the_fork_server(tmp_path):
    """Each attempt is one process (``forkserver launch``) that the supervisor starts and reads the exit
    code of: the first fails by torchrun's rule (rank 1 exits 3: the job exits 1), the relaunch with
    ``run.resume=auto`` succeeds."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    job, summary = _supervised(tmp_path, "ok", [str(script), str(out), "fail"])
    rc, text = job.wait(180)
    assert rc == 0, text
    assert [a["exit_code"] for a in json.loads(summary.read_text())["attempts"]] == [1, 0], text
    assert text.count("rank 0 done") == text.count("rank 1 done") == 2
    report = json.loads((out / "1.json").read_text())
    assert report["argv"][-1] == "run.resume=auto" and report["env"]["RANK"] == "1"


@pytest.mark.distributed
def test_a_supervised_job_past_its_timeout_fails_with_its_ranks_stacks_and_leaves_nothing_running(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import faulthandler, os, signal, time\nfaulthandler.register(signal.SIGUSR1)\n"
                      "os.write(1, f'up {os.getpid()}\\n'.encode())\ntime.sleep(600)\n")  # one write per line
    job, _ = _supervised(tmp_path, "hang", [str(script)])
    try:
        deadline = time.monotonic() + 60
        while job.output().count("up ") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        ranks = [int(line.split()[1]) for line in job.output().splitlines() if line.startswith("up ")]
        others = job.groups()  # the supervisor's and its attempt's (the client's) process groups
        assert len(ranks) == 2 and len(others) == 2, job.output()
    except BaseException:
        job.kill()
        raise
    with pytest.raises(pytest.fail.Exception, match="still running after 1 s") as failed:
        job.wait(1)
    assert str(failed.value).count("hang.py") >= 2  # both ranks' stacks (SIGUSR1 passed on by the attempt)
    for pid in ranks:
        assert _pid_gone(pid, 20), f"rank process {pid} outlived the job's timeout"
    for pgid in others:
        assert _gone(pgid, 20), f"process group {pgid} outlived the job's timeout"


def _pid_gone(pid: int, seconds: float) -> bool:
    import psutil

    deadline = time.monotonic() + seconds
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def test_run_job_keeps_other_commands_as_real_processes(tmp_path):
    job = start([sys.executable, "-c", "print('plain')"], run_env())
    assert type(job) is Job
    assert job.wait(60) == (0, "plain\n")
    assert run_job([sys.executable, "-c", "import sys; sys.exit(4)"], run_env(), 60)[0] == 4


def test_the_project_logger_decides_rank_tag_and_level_when_a_record_is_emitted(monkeypatch):
    """A logger made before the rank is known (at import, in the fork server) still tags and filters by
    the rank of the process that logs."""
    import logging

    from beit3.runtime import telemetry
    from beit3.runtime.telemetry import _RankFilter

    def emitted(level: int, rank: str):  # the rank as telemetry.rank() reports it at emit time
        monkeypatch.setattr(telemetry, "rank", lambda: int(rank))  # (a process group another test left is ignored)
        record = logging.LogRecord("beit3.x", level, __file__, 1, "msg", None, None)
        return _RankFilter().filter(record), record.rank

    assert emitted(logging.INFO, "0") == (True, 0)
    assert emitted(logging.INFO, "1") == (False, 1)
    assert emitted(logging.WARNING, "1") == (True, 1)
