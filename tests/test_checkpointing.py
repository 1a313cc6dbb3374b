"""Checkpoint helpers against a real DeepSpeed engine on CPU (1 process; 2 ranks are covered by
the distributed tokenizer-training test)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from beit3.runtime.checkpointing import LATEST, MARKER, CheckpointError, CheckpointManager, PreemptionGuard


@pytest.fixture(scope="module")
def engine():
    import deepspeed

    from beit3.runtime.engine import init_distributed

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}, "steps_per_print": 10 ** 9}
    eng, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return eng


def _train_step(eng) -> None:
    x = torch.randn(2, 8)
    loss = eng(x).pow(2).mean()
    eng.backward(loss)
    eng.step()


def _params(eng) -> list[torch.Tensor]:
    return [p.detach().clone() for p in eng.module.parameters()]


def test_save_load_prune_and_incomplete(engine, tmp_path):
    cm = CheckpointManager(str(tmp_path / "ckpt"), keep_last=2)
    assert cm.latest_tag() is None and cm.load(engine) is None  # nothing to resume
    saved = {}
    for step in (1, 2, 3):
        _train_step(engine)
        path = cm.save(engine, step, {"step": step, "loader": {"pos": step * 10}})
        assert os.path.isfile(os.path.join(path, MARKER))
        saved[step] = _params(engine)
    assert cm.complete_tags() == ["step_00000002", "step_00000003"]  # pruned to the last 2
    assert cm.latest_tag() == "step_00000003"
    assert open(tmp_path / "ckpt" / LATEST).read() == "step_00000003"
    marker = cm.marker("step_00000003")
    assert marker["world_size"] == 1 and marker["step"] == 3

    # a save killed after the shards were written but before the marker: ignored
    _train_step(engine)
    engine.save_checkpoint(cm.root, tag="step_00000004", client_state={}, save_latest=False)
    assert cm.latest_tag() == "step_00000003"
    with pytest.raises(CheckpointError, match="incomplete"):
        cm.load(engine, tag="step_00000004")

    state = cm.load(engine)  # auto -> newest complete
    assert state == {"step": 3, "loader": {"pos": 30}, "world_size": 1}
    for a, b in zip(_params(engine), saved[3]):
        assert torch.equal(a, b)
    state = cm.load(engine, tag="step_00000002")
    assert state["step"] == 2
    for a, b in zip(_params(engine), saved[2]):
        assert torch.equal(a, b)

    # the next complete save prunes the stale incomplete directory
    cm.save(engine, 5, {"step": 5})
    assert not (tmp_path / "ckpt" / "step_00000004").exists()
    assert cm.complete_tags() == ["step_00000003", "step_00000005"]


def test_preemption_guard_flags_signal():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop() and guard.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == previous


def test_keep_last_validated():
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager("/tmp/x", keep_last=0)


# ---- verified checkpoints ---------------------------------------------------------------------
def _shard(cm, tag, pattern):
    names = sorted(n for n in cm.marker(tag)["files"] if pattern in n)
    assert names, cm.marker(tag)["files"]
    return os.path.join(cm.root, tag, names[0])


def test_marker_lists_every_file_with_size_and_checksum(engine, tmp_path):
    from beit3.runtime.ckpt_io import HASH, file_digest

    cm = CheckpointManager(str(tmp_path / "ckpt"))
    _train_step(engine)
    path = cm.save(engine, 1, {"step": 1})
    files = cm.marker("step_00000001")["files"]
    on_disk = sorted(n for n in os.listdir(path) if n != MARKER)
    assert sorted(files) == on_disk and len(on_disk) >= 2  # model states + optimizer states
    for name, entry in files.items():
        assert (entry["size"], entry[HASH]) == file_digest(os.path.join(path, name)) and entry["rank"] == 0
    assert cm.verify("step_00000001") == []


def test_truncated_shard_falls_back_with_a_warning_naming_it(engine, tmp_path, caplog):
    cm = CheckpointManager(str(tmp_path / "ckpt"))
    for step in (1, 2):
        _train_step(engine)
        cm.save(engine, step, {"step": step})
        if step == 1:
            good = _params(engine)
    victim = _shard(cm, "step_00000002", "optim_states")
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match="optim_states.*truncated"):
        cm.load(engine, tag="step_00000002")  # an explicit tag: no silent fallback
    with caplog.at_level("WARNING", logger="beit3.runtime.checkpointing"):
        state = cm.load(engine)
    assert state["step"] == 1
    assert any(victim in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    for a, b in zip(_params(engine), good):
        assert torch.equal(a, b)
    assert cm.latest_tag() == "step_00000001"  # set aside (COMPLETE.damaged), not chosen again
    assert os.path.isfile(os.path.join(cm.root, "step_00000002", "COMPLETE.damaged"))


def test_missing_or_corrupted_shard_is_named(engine, tmp_path, caplog):
    cm = CheckpointManager(str(tmp_path / "ckpt"))
    for step in (1, 2, 3):
        _train_step(engine)
        cm.save(engine, step, {"step": step})
    missing = _shard(cm, "step_00000003", "model_states")
    os.remove(missing)
    flipped = _shard(cm, "step_00000002", "optim_states")
    with open(flipped, "r+b") as f:  # same size, one byte changed
        f.seek(os.path.getsize(flipped) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cm.verify("step_00000003") == [f"{missing}: missing"]
    with caplog.at_level("WARNING", logger="beit3.runtime.checkpointing"):
        assert cm.load(engine)["step"] == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"{missing}: missing" in text and f"{flipped}: xxh3_64 checksum differs" in text


def test_nonfinite_weights_never_marked_complete(engine, tmp_path, caplog):
    cm = CheckpointManager(str(tmp_path / "ckpt"))
    _train_step(engine)
    cm.save(engine, 1, {"step": 1})
    p = next(engine.module.parameters())
    keep = p.detach().clone()
    with torch.no_grad():
        p[0, 0] = float("nan")
    try:
        with caplog.at_level("ERROR", logger="beit3.runtime.checkpointing"):
            assert cm.save(engine, 2, {"step": 2}) is None
    finally:
        with torch.no_grad():
            p.copy_(keep)
    assert cm.complete_tags() == ["step_00000001"] and not os.path.exists(os.path.join(cm.root, "step_00000002"))
    assert any("non-finite weights" in r.getMessage() and "0.weight" in r.getMessage() for r in caplog.records)


def test_async_save_writes_the_snapshot_and_marks_it_later(engine, tmp_path):
    cm = CheckpointManager(str(tmp_path / "ckpt"), async_save=True)
    _train_step(engine)
    cm.save(engine, 1, {"step": 1})
    cm.finalize()
    _train_step(engine)
    at_save = _params(engine)
    cm.save(engine, 2, {"step": 2})
    assert cm.pending_tag == "step_00000002" and cm.latest_tag() == "step_00000001"  # no marker yet
    for _ in range(3):  # training goes on (in place) while the writer thread works
        _train_step(engine)
        cm.poll()
    assert cm.finalize() in (None, "step_00000002") and cm.pending_tag is None
    assert cm.latest_tag() == "step_00000002" and cm.verify("step_00000002") == []
    assert cm.last_save["blocked_s"] <= cm.last_save["total_s"]
    assert cm.load(engine)["step"] == 2
    for a, b in zip(_params(engine), at_save):  # the state at save time, not the live one after it
        assert torch.equal(a, b)


_KILL_CHILD = r'''
import json, os, signal, sys, time
import torch
import beit3.runtime.ckpt_io as ckpt_io
from beit3.runtime.checkpointing import CheckpointManager
from beit3.runtime.engine import build_engine, fill_batch_fields, init_distributed, load_ds_config
from beit3.runtime.optim import OptimConfig

mode, root = sys.argv[1], sys.argv[2]
init_distributed()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
optim = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=100)
ds = fill_batch_fields(load_ds_config("zero3_bf16.json"), 4, 1)
engine, _, _ = build_engine(model, ds, [{"params": list(model.parameters())}], optim)
cm = CheckpointManager(root, async_save=True)

def step():
    loss = engine(torch.randn(4, 32, dtype=torch.bfloat16)).float().pow(2).mean()
    engine.backward(loss)
    engine.step()

if mode == "save":
    step()
    cm.save(engine, 1, {"step": 1})
    cm.finalize()
    real = ckpt_io.write_durable

    def write_then_die(obj, path, rank):  # kill -9 mid-save: after the first file is durable
        entry = real(obj, path, rank)
        os.kill(os.getpid(), signal.SIGKILL)
        return entry

    ckpt_io.write_durable = write_then_die
    step()
    cm.save(engine, 2, {"step": 2})
    while True:  # training would go on here; the writer thread kills the process
        step()
        cm.poll()
else:
    t0 = time.perf_counter()
    state = cm.load(engine)
    print("RESULT " + json.dumps({"step": state["step"], "load_s": time.perf_counter() - t0,
                                  "complete": cm.complete_tags()}))
'''


@pytest.mark.slow
def test_kill9_during_background_save_resumes_from_previous(tmp_path):
    """A real SIGKILL while the background writer is mid-save: the tag never looks complete."""
    from beit3.testing.jobs import REPO, run_env

    def env() -> dict[str, str]:  # its own one-process group, not this process's port: without RANK the child's
        # init_distributed reserves a port for its lifetime (runtime.ports; released when it exits or is killed)
        group = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")
        return {k: v for k, v in run_env().items() if k not in group}

    root = tmp_path / "ckpt"
    script = tmp_path / "child.py"
    script.write_text(_KILL_CHILD)
    killed = subprocess.run([sys.executable, str(script), "save", str(root)], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    partial = root / "step_00000002"
    assert partial.is_dir() and any(partial.iterdir())  # files of the killed save are there ...
    cm = CheckpointManager(str(root))
    assert not cm.is_complete("step_00000002") and cm.latest_tag() == "step_00000001"  # ... but no marker
    resumed = subprocess.run([sys.executable, str(script), "resume", str(root)], cwd=REPO, env=env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout.split("RESULT ", 1)[1])
    assert result["step"] == 1 and result["complete"] == ["step_00000001"]


def test_export_verifies_before_exporting(engine, tmp_path):
    from beit3.pretrain.export import export

    cm = CheckpointManager(str(tmp_path / "ckpt"))
    _train_step(engine)
    cm.save(engine, 1, {"step": 1})
    victim = _shard(cm, "step_00000001", "model_states")
    with open(victim, "ab") as f:  # grown: overwritten by something else
        f.write(b"\0" * 10)
    with pytest.raises(CheckpointError, match=f"not exporting: {victim}: .* bytes, the marker records"):
        export(cm.root, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_deepspeed_checkpoint_writer_rejected_at_start_up():
    from beit3.model.config import ConfigError
    from beit3.runtime.checkpointing import check_ds_config

    check_ds_config({"checkpoint": {"tag_validation": "Warn"}})
    with pytest.raises(ConfigError, match=r"checkpoint\.writer.*run\.async_save"):
        check_ds_config({"checkpoint": {"writer": {"type": "python", "decoupled": True}}})
