"""Runs that survive faults: divergence guard, hang watchdog, fault injection, supervisor.

Unit tier: the guard's decisions on one process, the fault spec, the supervisor on a real child
process. Distributed tier: real 2-rank ZeRO-3 launches with ``BEIT3_INJECT_FAULT``.
"""
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from beit3.model.config import ConfigError
from beit3.runtime import supervise
from beit3.runtime.faults import ENV, FaultInjector, parse_faults, read_ledger
from beit3.runtime.guard import DivergenceError, DivergenceGuard, GuardConfig
from beit3.testing.jobs import REPO, launch_cmd, metrics, overrides, reserve_port, run_env, run_job, start


# ---- unit tier ------------------------------------------------------------------------------------
def test_fault_spec_parses_and_rejects_malformed():
    assert [f.key() for f in parse_faults("nan:step=5:rank=1, exit:step=9:rank=0")] == [
        ("nan", 5, 1), ("exit", 9, 0)]
    assert parse_faults("") == []
    for bad in ("boom:step=1:rank=0", "nan:step=1", "nan:step=x:rank=0", "nan:rank=0:step=1:extra=2"):
        with pytest.raises(ValueError, match=ENV):
            parse_faults(bad)


def test_fault_fires_once_per_run_directory(tmp_path):
    inj = FaultInjector(str(tmp_path), rank=1, spec="nan:step=3:rank=1,nan:step=4:rank=0")
    loss = torch.tensor(2.0)
    assert torch.isfinite(inj.corrupt_loss(loss, 2)) and not torch.isfinite(inj.corrupt_loss(loss, 3))
    assert [r["step"] for r in read_ledger(str(tmp_path))] == [3]
    again = FaultInjector(str(tmp_path), rank=1, spec="nan:step=3:rank=1")  # a relaunch
    assert torch.isfinite(again.corrupt_loss(loss, 3))
    assert FaultInjector(str(tmp_path), rank=0, spec="").pending == []  # inert when unset


@pytest.mark.parametrize("field,value", [("spike_factor", 0.5), ("ema_decay", 1.0), ("max_consecutive_skips", 0),
                                         ("rollback_window", 0), ("max_rollbacks", -1)])
def test_guard_config_names_the_bad_field(field, value):
    with pytest.raises(ConfigError, match=f"guard.{field}"):
        GuardConfig(**{field: value})


def _step(guard, step, loss, applied=None):
    out = guard.check_micro(torch.tensor(loss), step)
    return guard.end_step(step, torch.isfinite(out).item() if applied is None else applied)


def test_guard_skips_non_finite_and_rolls_back_after_k_skips():
    guard = DivergenceGuard(GuardConfig(max_consecutive_skips=3, spike_warmup_steps=1), world_size=1)
    assert not _step(guard, 1, 5.0)
    assert not torch.isfinite(guard.check_micro(torch.tensor(float("inf")), 2))
    assert not guard.end_step(2, applied=False)
    assert not _step(guard, 3, 5.0, applied=False)  # DeepSpeed's own overflow skip (finite loss) counts too
    assert guard.metrics() == {"skipped_steps": 2, "rollbacks": 0, "applied": 0} and guard.consecutive == 2
    assert _step(guard, 4, float("nan"))  # third in a row: rollback
    assert guard.plan_rollback(4, [(1, "step_00000001"), (3, "step_00000003")]) == "step_00000001"
    assert guard.skip_windows == [[2, 4]]
    assert [guard.next_data_step(s) for s in (1, 2, 4, 5)] == [1, 5, 5, 5]
    guard.check_micro(torch.tensor(float("nan")), 5)
    guard.end_step(5, applied=True)  # an optimizer that ignores the NaN is refused at the next read
    with pytest.raises(RuntimeError, match="does not skip non-finite gradients"):
        guard.metrics()


def test_guard_spike_rolls_back_and_recurring_rollbacks_diverge():
    guard = DivergenceGuard(GuardConfig(spike_factor=3.0, spike_warmup_steps=2, max_rollbacks=1,
                                        rollback_window=50), world_size=1)
    for step in (1, 2):
        assert not _step(guard, step, 10.0)
    assert not torch.isfinite(guard.check_micro(torch.tensor(31.0), 3))  # 31 > 3 x 10: discarded
    assert guard.end_step(3, applied=False)
    assert guard.plan_rollback(3, [(2, "step_00000002")]) == "step_00000002"
    state = guard.state_dict()
    assert state["skip_windows"] == [[3, 3]] and state["rollbacks"][0]["to"] == 2
    assert _step(guard, 4, 100.0)
    with pytest.raises(DivergenceError, match="diverges: 2 rollbacks within 50 steps"):
        guard.plan_rollback(4, [(2, "step_00000002")])
    fresh = DivergenceGuard(GuardConfig(), world_size=1)
    fresh.load_state_dict(state)
    assert fresh.skip_windows == [[3, 3]] and fresh.skipped_steps == 1 and fresh.ema_count == 2
    older = DivergenceGuard(GuardConfig(), world_size=1)
    older.load_state_dict({"skip_windows": [[1, 1]], "skipped_steps": 0})
    older.merge(state)  # a resume from a checkpoint older than the rollback still skips its window
    assert older.skip_windows == [[1, 1], [3, 3]] and older.skipped_steps == 1 and len(older.rollbacks) == 1
    with pytest.raises(DivergenceError, match="no complete checkpoint before step 1"):
        d = DivergenceGuard(GuardConfig(), world_size=1)
        d.plan_rollback(1, [])


def _heartbeat(wd, rank, **row):
    base = {"nonce": wd.nonce, "rank": rank, "pid": None, "host": "elsewhere", "step": 7, "in_collective": True}
    (wd.dir / f"hb_rank{rank}.json").write_text(json.dumps({**base, **row}))


def test_watchdog_names_the_frozen_or_the_non_waiting_rank(tmp_path):
    from beit3.runtime.watchdog import HangWatchdog, in_collective

    wd = HangWatchdog(str(tmp_path), rank=0, world_size=3, timeout_s=10)
    wd.dir.mkdir()
    wd.nonce, now = "n1", time.time()
    for r in range(3):
        _heartbeat(wd, r, progress=now - 1, alive=now)
    assert wd._check() is None  # everyone progressed recently
    _heartbeat(wd, 0, progress=now - 30, alive=now)
    _heartbeat(wd, 1, progress=now - 30, alive=now, in_collective=False, step=5)
    _heartbeat(wd, 2, progress=now - 30, alive=now)
    assert wd._check()[:3] == (1, "stalled", 5)  # the one not waiting in a collective
    _heartbeat(wd, 2, progress=now - 30, alive=now - 60, step=6)  # heartbeat thread silent too
    assert wd._check()[:3] == (2, "stopped (no heartbeat: frozen or dead process)", 6)
    _heartbeat(wd, 2, nonce="an earlier launch", progress=now, alive=now)  # ignored: counts as silent
    assert wd._check()[0] == 2
    assert not in_collective(threading.get_ident())


def test_watchdog_names_the_stalled_rank_when_the_waiting_one_blocks_outside_a_collective(tmp_path):
    """Under NCCL a rank waiting for a stalled peer blocks at its next host sync (a plain wait, no
    torch.distributed frame), not in the collective: ``waiting()`` around the step's syncs says so in
    its heartbeat, and the rank stalled elsewhere (here in step 4's data) is the one named."""
    from beit3.runtime.watchdog import HangWatchdog

    wd = HangWatchdog(str(tmp_path), rank=0, world_size=2, timeout_s=10)
    wd.dir.mkdir()
    wd.nonce, now = "n1", time.time()
    wd._armed, wd._step, wd._progress = True, 4, now - 40  # rank 0 began step 4 first, then waits in it
    _heartbeat(wd, 1, progress=now - 30, alive=now, step=4, in_collective=False)

    def heartbeat_while_main_thread_waits(release):
        wd._write()  # what the heartbeat thread writes while the main thread blocks
        release.set()

    wd._write()  # main thread not inside waiting(): rank 0 looks idle too and, oldest, is blamed
    assert wd._check()[:2] == (0, "stalled")
    release = threading.Event()
    with wd.waiting():  # the main thread blocks here as at DeepSpeed's gradient-norm read
        threading.Thread(target=heartbeat_while_main_thread_waits, args=(release,)).start()
        assert release.wait(10)
    assert json.loads((wd.dir / "hb_rank0.json").read_text())["in_collective"] is True
    assert wd._check()[:3] == (1, "stalled", 4)
    wd._write()
    assert json.loads((wd.dir / "hb_rank0.json").read_text())["in_collective"] is False  # left waiting()


@pytest.mark.slow
def test_sigusr1_prints_the_stacks_and_the_process_goes_on(tmp_path):
    body = ("import sys, time\nfrom beit3.runtime.watchdog import dump_stacks_on_signal\n"
            "def waiting_here():\n    time.sleep(0.2)\n"
            "dump_stacks_on_signal()\nprint('ready', flush=True)\nfor _ in range(15):\n    waiting_here()\n"
            "print('went on', flush=True)\n")
    proc = subprocess.Popen(_script(tmp_path, body), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "went on" in out
    assert "waiting_here" in err and "job.py" in err


@pytest.mark.slow
def test_exit_within_ends_a_shutdown_that_hangs_with_the_code_and_stacks(tmp_path):
    body = ("import atexit, threading\nfrom beit3.runtime.watchdog import exit_within\n"
            "def stuck_at_exit():\n    threading.Event().wait()\n"  # a shutdown step that never returns
            "atexit.register(stuck_at_exit)\nexit_within(3, grace_s=1)\n")
    t0 = time.time()
    proc = subprocess.run(_script(tmp_path, body), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and time.time() - t0 < 30
    assert "exit with code 3 still not done after 1 s" in proc.stderr and "stuck_at_exit" in proc.stderr


def _script(tmp_path, body):
    path = tmp_path / "job.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_supervisor_restarts_with_resume_auto_until_success(tmp_path):
    body = ("import sys, pathlib\np = pathlib.Path(sys.argv[0]).with_name('n'); n = int(p.read_text()) if p.exists() "
            "else 0\np.write_text(str(n + 1)); open(p.with_name('args'), 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
            "sys.exit(0 if n == 2 else 1)\n")
    summary = tmp_path / "summary.json"
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    rc = supervise.main(["--backoff", "0", "--summary", str(summary), "--", *_script(tmp_path, body),
                         "run.resume=none", "x=1"])
    assert rc == 0
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers  # the caller's are back
    assert (tmp_path / "args").read_text().splitlines() == ["run.resume=none x=1", "x=1 run.resume=auto",
                                                            "x=1 run.resume=auto"]
    got = json.loads(summary.read_text())
    assert got["outcome"] == "finished" and [a["exit_code"] for a in got["attempts"]] == [1, 1, 0]


@pytest.mark.parametrize("code,outcome", [(2, "configuration error"), (3, "diverged"),
                                          (5, "the last checkpoint could not be written"), (7, "gave up after 1")])
def test_supervisor_stops_on_config_error_divergence_and_after_max_restarts(tmp_path, code, outcome):
    summary = tmp_path / "summary.json"
    cmd = _script(tmp_path, f"import sys\nsys.exit({code})\n")
    rc = supervise.main(["--max-restarts", "1", "--backoff", "0", "--summary", str(summary), "--", *cmd])
    got = json.loads(summary.read_text())
    assert rc == code and got["outcome"].startswith(outcome)
    assert len(got["attempts"]) == (2 if code == 7 else 1)


# ---- distributed tier: 2 CPU ranks, ZeRO-3 bf16, tiny preset --------------------------------------
STEPS = 8
BASE = {"run.max_steps": STEPS, "run.save_every": 4, "optim.warmup_steps": 2}


def _run(args, fault=None, timeout=300, ds_config="zero3_bf16.json", launcher="deepspeed"):
    env = run_env()
    if fault:
        env[ENV] = fault
    t0 = time.time()
    with reserve_port() as port:
        rc, out = run_job(launch_cmd(2, port, args, ds_config=ds_config, launcher=launcher), env, timeout)
    return rc, out, time.time() - t0


@pytest.fixture(scope="module")
def reference(reference_run):
    """The session's reference run (the same recipe as BASE, with more steps)."""
    return metrics(reference_run)


@pytest.mark.distributed
def test_nan_on_one_rank_is_skipped_on_both_and_counted(demo_data, tiny_tokenizer, reference, tmp_path):
    rc, out, _ = _run(overrides(demo_data, tiny_tokenizer, tmp_path, **BASE), fault="nan:step=5:rank=1",
                      launcher="torchrun")
    assert rc == 0, out[-4000:]
    rows = metrics(tmp_path)
    for step in range(1, 5):  # identical up to the skipped step
        assert rows[step]["loss"] == reference[step]["loss"], step
    assert [rows[s]["skipped_steps"] for s in range(1, STEPS + 1)] == [0] * 4 + [1] * 4
    assert rows[5]["grad_norm"] == float("inf") and rows[5]["lr"] == rows[4]["lr"]  # not applied, schedule held
    assert rows[6]["lr"] == reference[5]["lr"]  # the schedule is one applied step behind from then on
    for rank in (0, 1):
        assert f"[rank{rank}] beit3.runtime.guard: step 5 skipped on every rank: non-finite loss on 1 rank(s)" in out
    assert "skipped_steps 1" in out
    states = sorted((tmp_path / "checkpoints" / "step_00000008").glob("*rank_0*model_states.pt"))
    client = torch.load(states[0], weights_only=False)["client_state"]
    assert client["guard"]["skipped_steps"] == 1


@pytest.fixture(scope="module")
def accumulation_run(demo_data, tiny_tokenizer, tmp_path_factory):
    """``accumulation_run(stage)``: (metrics, output) of a 2-rank run under ``zero{stage}_bf16.json``
    with 2 micro-steps per step and a NaN in rank 1's first micro-step of step 4; each stage
    launched once per module (the NaN-skip and the ZeRO-stage tests read the same runs)."""
    runs = {}

    def run(stage: int):
        if stage not in runs:
            work = tmp_path_factory.mktemp(f"zero{stage}_accum")
            ds = json.loads((REPO / "ds_configs" / f"zero{stage}_bf16.json").read_text())
            ds["gradient_accumulation_steps"] = 2
            (work / "ds.json").write_text(json.dumps(ds))
            args = overrides(demo_data, tiny_tokenizer, work / "run", **{"run.max_steps": 6, "run.save_every": 3,
                                                                         "optim.warmup_steps": 2})
            rc, out, _ = _run(args, fault="nan:step=4:rank=1", ds_config=str(work / "ds.json"), launcher="torchrun")
            assert rc == 0, out[-4000:]
            runs[stage] = metrics(work / "run"), out
        return runs[stage]

    return run


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_nan_skip_with_grad_accumulation_and_zero_stages(accumulation_run, stage):
    """ZeRO-1/2/3 with 2 micro-steps per step: a NaN in rank 1's first micro-step of step 4 discards
    the whole step on both ranks (the second micro-step, finite everywhere, too)."""
    rows, out = accumulation_run(stage)
    assert [rows[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 0, 1, 1, 1]
    assert [rows[s]["applied"] for s in range(1, 7)] == [1, 1, 1, 0, 1, 1]
    assert rows[4]["grad_norm"] == float("inf") and rows[4]["lr"] == rows[3]["lr"] > rows[5]["lr"]
    assert all(torch.isfinite(torch.tensor(rows[s]["loss"])) for s in rows)
    for rank in (0, 1):
        assert f"[rank{rank}] beit3.runtime.guard: step 4 skipped on every rank: non-finite loss on 1 rank(s)" in out


@pytest.mark.distributed
def test_zero_stages_give_the_same_first_step_loss(accumulation_run):
    """The same data, seed and weights under ZeRO-1, -2 and -3: the same first-step loss."""
    losses = {stage: accumulation_run(stage)[0][1]["loss"] for stage in (1, 2, 3)}
    assert losses[1] == pytest.approx(losses[3], rel=1e-3) and losses[2] == pytest.approx(losses[3], rel=1e-3), losses


@pytest.mark.distributed
def test_divergence_rolls_back_then_exits_naming_divergence(demo_data, tiny_tokenizer, tmp_path):
    args = overrides(demo_data, tiny_tokenizer, tmp_path, **{
        "run.max_steps": 12, "run.save_every": 1, "optim.lr": 3, "optim.warmup_steps": 4,
        "guard.spike_warmup_steps": 1, "guard.max_rollbacks": 2})
    with reserve_port() as port:
        job = start(launch_cmd(2, port, args, launcher="torchrun"), run_env())
        rc, out = job.wait(300)
    assert rc == 1 and job.first_failure == 3, out[-4000:]  # DeepSpeed's launcher exits with 3 (test_stall: its rule)
    assert "rollback at step 2: reloading step_00000001, data steps 2-2 will be skipped" in out
    assert "skipping data steps 2-3 (rolled back from there)" in out
    assert out.count("diverged: the run diverges: 3 rollbacks within 1000 steps") == 1
    assert sorted(metrics(tmp_path)) == [1]  # nothing after the first step was ever applied
    assert json.loads((tmp_path / "guard_state.json").read_text())["skip_windows"] == [[2, 2], [3, 3]]


@pytest.mark.distributed
def test_skip_window_of_a_rollback_survives_a_crash_before_the_next_save(demo_data, tiny_tokenizer, tmp_path):
    """A spike at step 5 rolls back to step 4; rank 1 dies at step 6, before the next save. The
    supervisor's relaunch resumes from step 4, whose client state predates the rollback: the skip
    window comes from rank 0's ``guard_state.json`` (broadcast), so data step 5 is skipped again
    and steps 6-8 equal those of the same run without the crash."""
    extra = {**BASE, "run.save_every": 2, "guard.spike_warmup_steps": 2}
    rc, out, _ = _run(overrides(demo_data, tiny_tokenizer, tmp_path / "ref", **extra), fault="spike:step=5:rank=0",
                      launcher="torchrun")
    assert rc == 0, out[-4000:]
    assert "rollback at step 5: reloading step_00000004, data steps 5-5 will be skipped" in out
    env = {**run_env(), ENV: "spike:step=5:rank=0,exit:step=6:rank=1"}
    with reserve_port() as port:  # held across the supervisor's relaunches (same port each attempt)
        cmd = launch_cmd(2, port, overrides(demo_data, tiny_tokenizer, tmp_path / "run", **extra), launcher="torchrun")
        rc, out = run_job([sys.executable, "-m", "beit3.runtime.supervise", "--backoff", "0", "--", *cmd], env,
                          timeout=600)
    assert rc == 0, out[-4000:]
    assert out.count("[rank1] beit3.runtime.loop: skipping data steps 5-5 (rolled back from there)") == 2  # rollback, resume
    assert "resumed from" in out and "step_00000004" in out
    ref, rows = metrics(tmp_path / "ref"), metrics(tmp_path / "run")
    assert sorted(rows) == sorted(ref) == [1, 2, 3, 4, 6, 7, 8]  # step 5's update was never applied
    for step in (6, 7, 8):
        assert rows[step]["loss"] == ref[step]["loss"], step


@pytest.mark.distributed
def test_stall_writes_stacks_and_exits_naming_rank_and_step(demo_data, tiny_tokenizer, tmp_path):
    timeout_s = 8
    args = overrides(demo_data, tiny_tokenizer, tmp_path, **{**BASE, "run.dist_timeout_s": timeout_s})
    rc, out, _ = _run(args, fault="stall:step=4:rank=1")
    ended = time.time()
    assert rc == 4, out[-4000:]
    assert out.count("hang: rank 1 stalled at step 4: no progress for") == 1
    stalled_at = read_ledger(str(tmp_path))[0]["time"]
    assert ended - stalled_at < timeout_s + 15, ended - stalled_at  # timeout + a small margin (launcher exit)
    stacks = {r: (tmp_path / "hang" / f"rank{r}.txt").read_text() for r in (0, 1)}
    assert "faults.py" in stacks[1] and "at_step_start" in stacks[1]  # where rank 1 stopped
    assert "torch/distributed" in stacks[0]  # rank 0 waits for it in a collective


@pytest.mark.distributed
def test_supervised_job_survives_two_single_rank_kills_with_identical_losses(demo_data, tiny_tokenizer,
                                                                            reference, tmp_path):
    args = overrides(demo_data, tiny_tokenizer, tmp_path / "run", **BASE)
    env = {**run_env(), ENV: "exit:step=3:rank=1,exit:step=6:rank=0"}
    summary = tmp_path / "summary.json"
    with reserve_port() as port:  # held across the supervisor's relaunches
        rc, out = run_job([sys.executable, "-m", "beit3.runtime.supervise", "--backoff", "0", "--summary",
                           str(summary), "--", *launch_cmd(2, port, args, launcher="torchrun")], env, timeout=900)
    assert rc == 0, out[-4000:]
    attempts = json.loads(summary.read_text())["attempts"]
    assert len(attempts) == 3 and attempts[-1]["exit_code"] == 0
    assert [(r["step"], r["rank"]) for r in read_ledger(str(tmp_path / "run"))] == [(3, 1), (6, 0)]
    rows = metrics(tmp_path / "run")
    assert sorted(rows) == list(range(1, STEPS + 1))
    for step in rows:
        assert rows[step]["loss"] == reference[step]["loss"], step
