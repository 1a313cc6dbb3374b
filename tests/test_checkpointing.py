"""Checkpoint helpers against a real DeepSpeed engine on CPU (1 process; 2 ranks are covered by
the distributed tokenizer-training test)."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from beit3.pretrain.checkpointing import LATEST, MARKER, CheckpointError, CheckpointManager, PreemptionGuard


@pytest.fixture(scope="module")
def engine():
    import deepspeed

    from beit3.pretrain.engine import init_distributed

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
