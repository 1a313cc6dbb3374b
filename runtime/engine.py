"""DeepSpeed engine construction shared by pretraining, tokenizer training and fine-tuning.

The DeepSpeed JSON (``ds_configs/``) holds ZeRO stage, precision, offload, accumulation and
monitoring; the optimizer and clipping come from our ``OptimConfig`` (one source of truth),
and the batch fields are filled from the data configuration and checked against the JSON
before any step runs.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from beit3.model.config import ConfigError

from .optim import OptimConfig, build_scheduler

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def load_ds_config(source: Union[str, Path, dict]) -> dict[str, Any]:
    """A DeepSpeed config from a dict, a path, or a file name inside ``ds_configs/``."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not path.is_file() and (DS_CONFIG_DIR / path.name).is_file():
        path = DS_CONFIG_DIR / path.name
    if not path.is_file():
        raise ConfigError(f"deepspeed_config={str(source)!r}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config={str(path)!r}: invalid JSON ({e})") from None


def grad_accum_steps(ds: dict[str, Any]) -> int:
    steps = ds.get("gradient_accumulation_steps", 1)
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"deepspeed_config.gradient_accumulation_steps={steps!r}: must be a positive integer")
    return steps


def fill_batch_fields(ds: dict[str, Any], micro_batch_per_rank: int, world_size: int) -> dict[str, Any]:
    """Set DeepSpeed's batch fields from ours, failing on a JSON that says otherwise."""
    ds = copy.deepcopy(ds)
    accum = grad_accum_steps(ds)
    want = {"train_micro_batch_size_per_gpu": micro_batch_per_rank,
            "train_batch_size": micro_batch_per_rank * accum * world_size}
    for key, value in want.items():
        if key in ds and ds[key] not in (value, "auto"):
            raise ConfigError(
                f"deepspeed_config.{key}={ds[key]} disagrees with the data config, which gives {value} "
                f"(micro batch {micro_batch_per_rank} per rank x accumulation {accum} x world size {world_size}); "
                f"remove {key} from the JSON or change the data batch sizes")
        ds[key] = value
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def free_port() -> int:
    """A free TCP port on the loopback interface (for a rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_process_group_env() -> None:
    """Without a launcher (``python -m ...``, a test calling ``main``), run as a single process."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def init_distributed(timeout_s: Optional[float] = None) -> tuple[int, int, torch.device]:
    """Join the launcher's process group (NCCL on GPUs, gloo on CPU), or make a one-process group;
    returns (rank, world size, this rank's device). ``timeout_s``: the collective timeout
    (default: torch's)."""
    from datetime import timedelta

    import deepspeed
    import torch.distributed as dist

    from .watchdog import dump_stacks_on_signal

    ensure_process_group_env()
    dump_stacks_on_signal()  # `kill -USR1 <pid>`: this rank's Python stacks on stderr
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", **kwargs)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype a DeepSpeed engine computes in: bf16, fp16 or fp32 from its config."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def build_engine(model: nn.Module, ds_config: dict[str, Any], groups: list[dict], optim: OptimConfig,
                 tensorboard_dir: Optional[str] = None, job_name: str = "beit3"):
    """``deepspeed.initialize`` with our AdamW settings and warmup/cosine schedule.

    Returns ``(engine, optimizer, scheduler)``.
    """
    import deepspeed

    ds = copy.deepcopy(ds_config)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    params: dict[str, Any] = {"lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps,
                              "weight_decay": optim.weight_decay}
    if not offload:  # the fused kernel needs CUDA; torch's AdamW elsewhere
        params["torch_adam"] = not torch.cuda.is_available()
    ds["optimizer"] = {"type": "AdamW", "params": params}
    ds["gradient_clipping"] = optim.grad_clip
    if tensorboard_dir:
        ds["tensorboard"] = {"enabled": True, "output_path": tensorboard_dir, "job_name": job_name}
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds,
        lr_scheduler=lambda opt: build_scheduler(opt, optim))
    return engine, optimizer, scheduler


__all__ = ["ensure_process_group_env", "free_port", "init_distributed", "engine_dtype", "load_ds_config", "fill_batch_fields", "grad_accum_steps", "zero_stage",
           "build_engine", "DS_CONFIG_DIR"]
