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
    """A rendezvous port reserved for the rest of this process's life (``runtime.ports``): below
    the kernel's ephemeral range and flock'ed against every other reservation on this machine,
    so no other job can take it between choosing and binding. For a launch, prefer
    ``with runtime.ports.reserve_port() as port:`` (released when the job ends)."""
    from .ports import reserve_port_for_process

    return reserve_port_for_process()


def ensure_process_group_env() -> None:
    """Without a launcher (``python -m ...``, a test calling ``main``), run as a single process
    (its rendezvous port stays reserved until the process exits)."""
    if "RANK" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


DEVICE_ENV = "BEIT3_DEVICE"
DEVICES = ("auto", "cpu", "cuda")


def select_device(requested: Optional[str] = None) -> tuple[str, torch.device]:
    """(process-group backend, this rank's device) from ``requested`` (``run.device``), else the
    ``BEIT3_DEVICE`` environment variable, else "auto":

    * "cpu": gloo on the CPU, whatever GPUs the machine has (the CPU test tier sets it);
    * "cuda": NCCL on ``cuda:LOCAL_RANK``; fails (ConfigError) without CUDA or when
      LOCAL_RANK >= the number of visible GPUs;
    * "auto": "cpu" without CUDA or when ``DS_ACCELERATOR=cpu`` (DeepSpeed would run on the CPU),
      else "cuda" -- with the same failure when there are more ranks on this node than GPUs
      (``deepspeed --num_gpus 2`` on a 1-GPU machine): never a silent fall-back to gloo for one
      rank while the others use NCCL.
    """
    choice = (requested or os.environ.get(DEVICE_ENV) or "auto").strip().lower()
    if choice not in DEVICES:
        raise ConfigError(f"run.device / {DEVICE_ENV}={choice!r}: must be one of {list(DEVICES)}")
    cuda = torch.cuda.is_available()
    if choice == "cpu" or (choice == "auto" and (not cuda or os.environ.get("DS_ACCELERATOR") == "cpu")):
        return "gloo", torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count() if cuda else 0
    if local_rank >= count:
        raise ConfigError(
            f"run.device / {DEVICE_ENV}={choice!r}: this rank has LOCAL_RANK={local_rank} but the machine shows "
            f"{count} CUDA device(s); launch at most {count} rank(s) per node "
            f"(deepspeed --num_gpus {max(count, 1)}) or set {DEVICE_ENV}=cpu")
    return "nccl", torch.device("cuda", local_rank)


def _agree_with_deepspeed(device: torch.device) -> None:
    """DeepSpeed picks its accelerator once, when it is first imported (``DS_ACCELERATOR``, else
    CUDA when torch sees a GPU): set ``DS_ACCELERATOR=cpu`` for a CPU run before that import, and
    fail clearly if it was imported already with the other accelerator."""
    import sys

    want = "cpu" if device.type == "cpu" else "cuda"
    if want == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    if "deepspeed" not in sys.modules:
        return
    from deepspeed.accelerator import get_accelerator

    have = get_accelerator().device_name()
    if have != want:
        raise ConfigError(
            f"run.device / {DEVICE_ENV}: this rank runs on {want} but DeepSpeed was imported with its {have} "
            f"accelerator; set DS_ACCELERATOR={want} in the launch environment")


# NCCL's own diagnostics, so that a hang leaves NCCL's traces beside the watchdog's stacks
NCCL_DIAGNOSTICS = {
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",  # flight recorder: the last 2000 collectives of each rank
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",  # written out when a collective times out
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",  # a failed or timed-out collective ends the process, not a hang
}


def nccl_diagnostics_env(trace_dir: Optional[str]) -> dict[str, str]:
    """The NCCL diagnostics variables to set before an NCCL group exists; a value already in the
    environment is the user's and is kept. ``trace_dir``: where the flight recorder dumps
    (``<trace_dir>/nccl_trace_rank_<N>``; the pretraining run's ``output_dir/hang``)."""
    env = dict(NCCL_DIAGNOSTICS)
    if trace_dir:
        env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = os.path.join(trace_dir, "nccl_trace_rank_")
    return {k: v for k, v in env.items() if k not in os.environ}


def init_distributed(timeout_s: Optional[float] = None, device: Optional[str] = None,
                     trace_dir: Optional[str] = None) -> tuple[int, int, torch.device]:
    """Join the launcher's process group, or make a one-process group; returns (rank, world size,
    this rank's device). ``device``: "auto", "cpu" or "cuda" (``select_device``; default from
    ``BEIT3_DEVICE``, else "auto"). ``timeout_s``: the collective timeout (default: torch's).
    Under NCCL, NCCL's diagnostics are switched on (``nccl_diagnostics_env``)."""
    from datetime import timedelta

    import torch.distributed as dist

    from .watchdog import dump_stacks_on_signal

    ensure_process_group_env()
    backend, dev = select_device(device)
    _agree_with_deepspeed(dev)
    import deepspeed

    dump_stacks_on_signal()  # `kill -USR1 <pid>`: this rank's Python stacks on stderr
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if backend == "nccl" and not dist.is_initialized():
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
        os.environ.update(nccl_diagnostics_env(trace_dir))
    if not dist.is_initialized():
        kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
        deepspeed.init_distributed(dist_backend=backend, **kwargs)
    return dist.get_rank(), dist.get_world_size(), dev


def shutdown_distributed() -> None:
    """The agreed end of a launched process: every rank reaches a barrier, then the group is
    destroyed before interpreter exit (a rank whose peer already tore gloo down otherwise dies in
    its destructor, "terminate called without an active exception", exit code 250). Only for
    ``__main__``: an in-process caller keeps its group (DeepSpeed caches it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def offloads_optimizer(ds: dict[str, Any]) -> bool:
    return (ds.get("zero_optimization") or {}).get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def _asks_for_deepspeed_adam(ds: dict[str, Any]) -> bool:
    """The JSON's ``optimizer.params.torch_adam: false``: DeepSpeed's own (JIT-built) FusedAdam."""
    return ((ds.get("optimizer") or {}).get("params") or {}).get("torch_adam") is False


def _on_cuda() -> bool:
    """Whether this process trains on CUDA (``init_distributed`` sets DS_ACCELERATOR=cpu otherwise)."""
    return (torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
            and os.environ.get(DEVICE_ENV, "auto").strip().lower() != "cpu")


def choose_optimizer(ds: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The DeepSpeed ``optimizer.params`` entries that pick the AdamW implementation, none of
    which needs a JIT build unless the JSON asks for it:

    * ZeRO offload of the optimizer: ``{}`` -- DeepSpeed requires its DeepSpeedCPUAdam (op
      ``cpu_adam``; ``check_optimizer_ops`` fails at validation when it cannot be built);
    * the JSON sets ``optimizer.params.torch_adam: false``: DeepSpeed's FusedAdam (op ``fused_adam``);
    * CUDA: torch's fused AdamW (``torch_adam`` + ``fused``; DeepSpeed 0.19.8 passes every
      remaining param to ``torch.optim.AdamW``);
    * CPU: torch's AdamW, unfused (bit-identical to earlier runs).
    """
    if offloads_optimizer(ds):
        return {}
    if _asks_for_deepspeed_adam(ds):
        return {"torch_adam": False}
    return {"torch_adam": True, "fused": True} if cuda else {"torch_adam": True}


def _nvcc() -> Optional[str]:
    import shutil

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isfile(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.path.join(os.environ[var], "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    return os.path.join(home, "bin", "nvcc") if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) else None


def op_unbuildable(builder: Any, needs_cuda: bool) -> Optional[str]:
    """Why DeepSpeed's op ``builder`` can be neither loaded prebuilt nor JIT-built here, or None."""
    import shutil

    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        installed_ops = {}
    if installed_ops.get(builder.NAME):
        return None  # compiled into the DeepSpeed install: no JIT build
    missing = []
    if not shutil.which("ninja"):
        missing.append("ninja")
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        missing.append("a C++ compiler")
    if needs_cuda and _nvcc() is None:
        missing.append("nvcc (CUDA_HOME)")
    if missing:
        return f"op {builder.NAME!r} is not prebuilt and a JIT build needs {', '.join(missing)}"
    if not builder.is_compatible(verbose=False):
        return f"op {builder.NAME!r} is not compatible here: {getattr(builder, 'error_log', None) or 'see ds_report'}"
    return None


def check_optimizer_ops(ds: dict[str, Any], cuda: Optional[bool] = None) -> None:
    """Validation, before any GPU time: the DeepSpeed op the optimizer needs (``choose_optimizer``)
    must be prebuilt or buildable, else a ConfigError naming the JSON field that asks for it."""
    cuda = _on_cuda() if cuda is None else cuda
    if offloads_optimizer(ds):
        from deepspeed.ops.op_builder import CPUAdamBuilder

        field = "zero_optimization.offload_optimizer.device"
        why = op_unbuildable(CPUAdamBuilder(), needs_cuda=cuda)
    elif _asks_for_deepspeed_adam(ds):
        field = "optimizer.params.torch_adam"
        if not cuda:
            raise ConfigError(f"deepspeed_config {field}=false: DeepSpeed's FusedAdam needs CUDA; "
                              f"remove it (torch's AdamW is used)")
        from deepspeed.ops.op_builder import FusedAdamBuilder

        why = op_unbuildable(FusedAdamBuilder(), needs_cuda=True)
    else:
        return
    if why:
        raise ConfigError(f"deepspeed_config {field}: {why}; install them, use a DeepSpeed built with the op "
                          f"(DS_BUILD_OPS=1), or remove the field")


def engine_dtype(engine: Any) -> torch.dtype:
    """The dtype a DeepSpeed engine computes in: bf16, fp16 or fp32 from its config."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def resolve_ds_config(flag: Optional[str], field: Optional[str], default: Optional[str] = None) -> str:
    """The one DeepSpeed JSON of a run, for every trainer: DeepSpeed's ``--deepspeed_config`` flag or
    its config-file twin ``run.deepspeed_config``; both given and different is a ConfigError naming
    both, neither gives ``default``."""
    if flag and field and flag != field:
        raise ConfigError(f"--deepspeed_config={flag!r} and run.deepspeed_config={field!r} name different JSONs; "
                          "give one")
    chosen = flag or field or default
    if not chosen:
        raise ConfigError("no DeepSpeed JSON: pass --deepspeed_config or set run.deepspeed_config")
    return chosen


def code_settings(optim: OptimConfig, tensorboard_dir: Optional[str] = None,
                  job_name: str = "beit3") -> dict[str, tuple[str, Any]]:
    """The JSON entries the trainers set from their own config: {JSON path: (our field, value)}."""
    out: dict[str, tuple[str, Any]] = {
        "optimizer.type": ("optim (AdamW)", "AdamW"), "optimizer.params.lr": ("optim.lr", optim.lr),
        "optimizer.params.betas": ("optim.beta1/beta2", [optim.beta1, optim.beta2]),
        "optimizer.params.eps": ("optim.eps", optim.eps),
        "optimizer.params.weight_decay": ("optim.weight_decay", optim.weight_decay),
        "gradient_clipping": ("optim.grad_clip", optim.grad_clip)}
    if tensorboard_dir:
        out.update({"tensorboard.enabled": ("run.tensorboard", True),
                    "tensorboard.output_path": ("run.output_dir", tensorboard_dir),
                    "tensorboard.job_name": ("the trainer's job name", job_name)})
    return out


def _json_value(ds: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = ds
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return False, None
        node = node[key]
    return True, node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def check_code_settings(ds: dict[str, Any], settings: dict[str, tuple[str, Any]]) -> None:
    """Nothing overridden silently: a JSON entry the code also sets must hold the same value
    (then it passes), else a ConfigError naming both the JSON path and our field."""
    clashes = []
    for path, (ours, value) in settings.items():
        present, theirs = _json_value(ds, path)
        if present and not _same(theirs, value):
            clashes.append(f"deepspeed_config {path}={theirs!r} but {ours}={value!r}")
    if clashes:
        raise ConfigError("; ".join(clashes) + " (set it in one place: the trainer's config sets these)")


def build_engine(model: nn.Module, ds_config: dict[str, Any], groups: list[dict], optim: OptimConfig,
                 tensorboard_dir: Optional[str] = None, job_name: str = "beit3"):
    """``deepspeed.initialize`` with our AdamW settings and warmup/cosine schedule.

    Returns ``(engine, optimizer, scheduler)``.
    """
    import deepspeed

    ds = copy.deepcopy(ds_config)
    check_code_settings(ds, code_settings(optim, tensorboard_dir, job_name))
    check_optimizer_ops(ds)
    params: dict[str, Any] = dict(((ds.get("optimizer") or {}).get("params") or {}))  # e.g. torch_adam
    params.update({"lr": optim.lr, "betas": [optim.beta1, optim.beta2], "eps": optim.eps,
                   "weight_decay": optim.weight_decay})
    params.update(choose_optimizer(ds, _on_cuda()))
    ds["optimizer"] = {"type": "AdamW", "params": params}
    ds["gradient_clipping"] = optim.grad_clip
    if tensorboard_dir:
        ds["tensorboard"] = {"enabled": True, "output_path": tensorboard_dir, "job_name": job_name}
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds,
        lr_scheduler=lambda opt: build_scheduler(opt, optim))
    return engine, optimizer, scheduler


__all__ = ["ensure_process_group_env", "free_port", "init_distributed", "nccl_diagnostics_env", "NCCL_DIAGNOSTICS", "select_device", "choose_optimizer",
           "check_optimizer_ops", "op_unbuildable", "offloads_optimizer", "DEVICE_ENV", "engine_dtype", "load_ds_config", "fill_batch_fields", "grad_accum_steps", "zero_stage",
           "build_engine", "DS_CONFIG_DIR", "shutdown_distributed",
           "resolve_ds_config", "code_settings", "check_code_settings"]
