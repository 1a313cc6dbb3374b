"""A full disk is a fault like the others: on a real small file system (tmpfs, mounted by the
test) a save that cannot fit is refused or fails with one line naming the tag, the directory and
the bytes needed and free; no tag is falsely complete, the previous complete tag is kept, training
goes on and the next save retries; the run's exit code for an unsaved last checkpoint is one the
supervisor does not retry."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys

import pytest

from beit3.runtime.checkpointing import MARKER, CheckpointManager
from tests.test_checkpointing import _train_step, engine  # noqa: F401 (the module's real DeepSpeed engine)


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs (root only: CI and this machine run as root)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if rc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {rc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(fs, leave: int) -> str:
    """A filler file that leaves ``leave`` bytes free on ``fs``."""
    path = os.path.join(fs, "filler")
    free = shutil.disk_usage(fs).free
    with open(path, "ab") as f:
        f.write(b"\0" * max(0, free - leave))
    return path


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_refused_or_failed_save_keeps_the_previous_tag_and_retries(engine, small_fs, caplog,  # noqa: F811
                                                                              async_save):
    cm = CheckpointManager(str(small_fs / "ckpt"), keep_last=3, async_save=async_save)
    _train_step(engine)
    first = cm.save(engine, 1, {"step": 1})
    cm.finalize()
    assert cm.latest_tag() == "step_00000001" and cm.unsaved is None
    part = sum(e["size"] for e in cm.marker("step_00000001")["files"].values())

    # (a) not enough room for the last checkpoint's size: refused before writing anything
    filler = _fill(small_fs, part // 2)
    with caplog.at_level(logging.ERROR, logger="beit3.runtime.checkpointing"):
        _train_step(engine)
        assert cm.save(engine, 2, {"step": 2}) is None
    assert not (small_fs / "ckpt" / "step_00000002").exists()
    line = [r.getMessage() for r in caplog.records if "NOT saved" in r.getMessage()][-1]
    assert "step_00000002" in line and str(small_fs / "ckpt") in line and "bytes free" in line
    assert f"stays {os.path.basename(first)}" in line and cm.unsaved["tag"] == "step_00000002"

    # (b) room for the states by the last size, not for DeepSpeed's extra files: the write fails
    # part way, its files are removed, nothing is marked complete, no exception reaches the loop
    os.remove(filler)
    filler = _fill(small_fs, int(part * 1.05) + 4096)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="beit3.runtime.checkpointing"):
        _train_step(engine)
        cm.save(engine, 3, {"step": 3})
        cm.finalize()
    assert not os.path.exists(small_fs / "ckpt" / "step_00000003" / MARKER)
    assert not (small_fs / "ckpt" / "step_00000003").exists()
    line = [r.getMessage() for r in caplog.records if "NOT saved" in r.getMessage()][-1]
    assert "step_00000003" in line and "no space left" in line and "bytes free" in line
    assert cm.complete_tags() == ["step_00000001"]
    with pytest.raises(RuntimeError, match="step_00000003 was not saved"):
        cm.raise_if_unsaved()

    # (c) space freed: the next save completes and the run is whole again
    os.remove(filler)
    _train_step(engine)
    cm.save(engine, 4, {"step": 4})
    cm.finalize()
    assert cm.complete_tags() == ["step_00000001", "step_00000004"] and cm.unsaved is None
    cm.raise_if_unsaved()
    assert cm.load(engine)["step"] == 4


def test_supervisor_does_not_restart_a_job_whose_last_save_found_no_space(tmp_path):
    from beit3.runtime import supervise

    summary = tmp_path / "summary.json"
    rc = supervise.main(["--max-restarts", "3", "--backoff", "0", "--summary", str(summary), "--",
                         sys.executable, "-c", "import sys; sys.exit(5)"])
    import json

    out = json.loads(summary.read_text())
    assert rc == 5 and out["restarts"] == 0 and "no space" in out["outcome"]


@pytest.mark.parametrize("async_save", [False, True])
def test_first_save_on_a_full_disk_fails_on_the_state_files_without_raising(engine, small_fs, async_save):  # noqa: F811
    cm = CheckpointManager(str(small_fs / "ckpt"), keep_last=3, async_save=async_save)
    os.makedirs(cm.root)
    _fill(small_fs, 2048)  # no last size to compare with: the state files themselves fail to write
    _train_step(engine)
    cm.save(engine, 1, {"step": 1})
    assert cm.finalize() is None
    assert cm.unsaved["tag"] == "step_00000001" and "no space left" in cm.unsaved["reason"]
    assert "optim_states" in cm.unsaved["reason"] or "model_states" in cm.unsaved["reason"]
    assert cm.complete_tags() == [] and not (small_fs / "ckpt" / "step_00000001").exists()
