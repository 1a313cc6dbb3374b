"""Shared set-up of the pretraining tests: demo data, a frozen tiny tokenizer, launches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from beit3.runtime.engine import free_port  # noqa: F401 (re-exported to the tests)

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "pretrain" / "train.py"
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
TINY_YAML = REPO / "pretrain" / "configs" / "tiny_demo.yaml"
# the session's demo data (conftest ``demo_data``) and the loss-curve reference are built from these
TEST_DATA_ARGS = dict(num_train=400, spm_vocab=400, samples_per_shard=100, max_docs=80)


def make_tokenizer(path: Path, image_shards: str, spm_path: str) -> Path:
    """A frozen tiny VQ-KD whose codebook is k-means-initialized on real image features
    (random encoder): distinct, deterministic targets without a training run."""
    from beit3.data_pipeline import DataConfig, ImageLoader
    from beit3.model.vqkd import VQKD, get_vqkd_config, save_tokenizer

    torch.manual_seed(0)
    model = VQKD(get_vqkd_config("tiny"))
    cfg = DataConfig(image_shards=[image_shards], texts=0, pairs=0, img_size=32, patch_size=8, num_workers=0,
                     spm_path=spm_path)
    batch = next(iter(ImageLoader(cfg, batch_size=64)))
    with torch.no_grad():
        z = model.encode(batch["tokenizer_images"])
        model.quantize.init_codebook_(z.reshape(-1, z.shape[-1]))
    save_tokenizer(model, str(path))
    return path


def random_codebook_tokenizer(path: Path) -> Path:
    """A frozen tiny VQ-KD with a random unit-norm codebook marked initialized: deterministic
    codes without any data (seed 0), for tests and benches of code precompute."""
    import torch.nn.functional as F

    from beit3.model.vqkd import VQKD, get_vqkd_config, save_tokenizer

    torch.manual_seed(0)
    tok = VQKD(get_vqkd_config("tiny"))
    with torch.no_grad():
        tok.quantize.embedding.weight.copy_(F.normalize(torch.randn_like(tok.quantize.codebook), dim=-1))
        tok.quantize.embedding.initted.fill_(1.0)
    save_tokenizer(tok, str(path))
    return path


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


def launch_cmd(nprocs: int, port: int, args: list[str], ds_config: str = "zero3_bf16.json",
               script: Path = TRAIN) -> list[str]:
    return [str(DEEPSPEED), "--num_gpus", str(nprocs), "--master_port", str(port), str(script),
            "--config", str(TINY_YAML), "--deepspeed_config", ds_config, *args]


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_job(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run a launcher command in its own process group; (exit code, stdout + stderr). A job still
    running after ``timeout`` fails the test with every process's Python stacks: SIGUSR1 (each
    rank registers a faulthandler dump on it, ``engine.init_distributed``), then SIGKILL to the
    whole group, so no rank outlives the test."""
    import signal
    import tempfile
    import time

    import pytest

    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGUSR1)
            time.sleep(5)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.seek(0)
            pytest.fail(f"job still running after {timeout} s, stacks of its processes (SIGUSR1) at the end of "
                        f"its output:\n{log.read()[-30000:]}")
        log.seek(0)
        return rc, log.read()


def launch(nprocs: int, args: list[str], ds_config: str = "zero3_bf16.json", timeout: int = 600,
           script: Path = TRAIN, env: dict[str, str] | None = None) -> str:
    rc, out = run_job(launch_cmd(nprocs, free_port(), args, ds_config, script), {**run_env(), **(env or {})}, timeout)
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
