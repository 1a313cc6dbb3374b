"""Train the VQ-KD image tokenizer with DeepSpeed on image shards.

    deepspeed --num_gpus 8 -m beit3.pretrain.train_vqkd --config vqkd.yaml \\
        data.image_shards=[/data/in21k/manifest.json] teacher.path=/weights/clip_vit_b16.pt

The decoder output regresses a frozen teacher's patch features by cosine distance; the
codebook follows the EMA of its assigned encoder vectors (all-reduced). Dead codes are avoided
by k-means initialisation on the first batch and (``codebook.reseed_dead``) re-seeding
codes unused for ``codebook.dead_after_steps`` steps with encoder vectors of the current batch.
Logs: reconstruction cosine, quantizer loss, codes used in the last ``codebook.usage_window``
steps, perplexity, re-seeded codes. Checkpoints and preemption go through
``runtime.checkpointing``; at the end rank 0 writes ``{run.out_dir}/tokenizer.pt``.
"""
from __future__ import annotations

import argparse
import json
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from beit3.data_pipeline import DataConfig, ImageLoader
from beit3.model.config import ConfigError
from beit3.model.safe_load import load_untrusted
from beit3.model.vqkd import TEACHER_KINDS, VQKD, VQKDConfig, build_teacher, get_vqkd_config, save_tokenizer

from beit3.runtime.checkpointing import CheckpointManager, PreemptionGuard
from beit3.model.config_io import load_config, to_dict
from beit3.runtime.engine import (build_engine, fill_batch_fields, init_distributed, load_ds_config,
                                  resolve_ds_config, zero_stage)
from beit3.runtime.optim import OptimConfig, param_groups
from beit3.runtime.telemetry import StepMeter, get_logger, log_step

logger = get_logger(__name__)


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class TeacherConfig:
    """Frozen teacher loaded from a local file (never downloaded).

    kind: ``clip`` (OpenAI CLIP state dict, full model or ``visual.*``), ``dino`` (timm/DINO
    ViT) or ``beit3`` (this project's checkpoint; ``beit3_preset`` gives its architecture).
    """

    kind: str = "clip"
    path: str = ""
    beit3_preset: str = "base"

    def __post_init__(self) -> None:
        if self.kind not in TEACHER_KINDS:
            raise ConfigError(f"teacher.kind={self.kind!r}: choose one of {TEACHER_KINDS}")


@dataclass
class CodebookConfig:
    """Dead codes: k-means init (``model.kmeans_init``) plus optional re-seeding of codes unused for a while."""

    reseed_dead: bool = True
    dead_after_steps: int = 200
    usage_window: int = 100

    def __post_init__(self) -> None:
        for name in ("dead_after_steps", "usage_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"codebook.{name}={getattr(self, name)}: must be >= 1")


DS_DEFAULT = "vqkd_zero1.json"


@dataclass
class RunConfig:
    out_dir: str = "runs/vqkd"
    batch_size: int = 64  # images per rank per step
    deepspeed_config: str = ""  # twin of --deepspeed_config; default vqkd_zero1.json
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    seed: int = 0
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "log_every", "save_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"run.{name}={getattr(self, name)}: must be >= 1")


def _tokenizer_optim() -> OptimConfig:
    # BEiT v2 TOKENIZER.md: AdamW (0.9, 0.99), wd 1e-4, lr 5e-5 x batch/128 (512 -> 2e-4), min 1e-5
    return OptimConfig(lr=2e-4, min_lr=1e-5, weight_decay=1e-4, beta1=0.9, beta2=0.99, eps=1e-8,
                       warmup_steps=1000, total_steps=100_000, grad_clip=3.0)


@dataclass
class TrainVQKDConfig:
    """VQ-KD training. ``preset`` + ``model`` overrides give the tokenizer (``VQKDConfig``);
    ``optim.total_steps`` is the run length; ``data`` is the data pipeline's config (image
    shards; ``data.img_size``/``patch_size`` must match the tokenizer)."""

    preset: str = "base"
    model: dict[str, Any] = field(default_factory=dict)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=_tokenizer_optim)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        tok = self.tokenizer_config()
        if self.data.tok_img_size != tok.img_size or self.data.patch_size != tok.patch_size:
            raise ConfigError(f"data.img_size/tokenizer_img_size={self.data.tok_img_size}, data.patch_size="
                              f"{self.data.patch_size} must match the tokenizer ({tok.img_size}/{tok.patch_size})")
        if not self.data.image_shards:
            raise ConfigError("data.image_shards: no image shards given")
        if self.data.offline_codes:
            raise ConfigError("data.offline_codes: must be false to train the tokenizer")
        if not self.teacher.path:
            raise ConfigError("teacher.path: a local teacher state-dict file is required")

    def tokenizer_config(self) -> VQKDConfig:
        return get_vqkd_config(self.preset, **self.model)


# ---------------------------------------------------------------------------------------------
# Codebook usage
# ---------------------------------------------------------------------------------------------
class CodeUsage:
    """Codes used in the last ``window`` steps, perplexity over that window, and dead codes
    (not used for ``after`` steps; a code counts from the start or from its last re-seed)."""

    NEVER = -(1 << 40)

    def __init__(self, num_codes: int, window: int) -> None:
        self.num_codes, self.window = num_codes, window
        self.last_seen = torch.full((num_codes,), self.NEVER, dtype=torch.long)  # step of last use
        self.alive_since = torch.zeros(num_codes, dtype=torch.long)  # start or last re-seed
        self.recent: deque[torch.Tensor] = deque(maxlen=window)
        self.step = 0

    def update(self, step: int, counts: torch.Tensor) -> None:
        counts = counts.detach().float().cpu()
        self.step = step
        self.last_seen[counts > 0] = step
        self.recent.append(counts)

    def used(self) -> int:
        """Codes assigned at least once in the last ``window`` steps."""
        return int((self.last_seen > self.step - self.window).sum())

    def perplexity(self) -> float:
        """exp(entropy) of the code histogram of the window (= num_codes when perfectly uniform)."""
        if not self.recent:
            return 0.0
        total = torch.stack(list(self.recent)).sum(0)
        p = total[total > 0] / total.sum()
        return float(torch.exp(-(p * p.log()).sum()))

    def dead(self, after: int) -> torch.Tensor:
        return (self.step - torch.maximum(self.last_seen, self.alive_since)) >= after

    def revive(self, codes: torch.Tensor) -> None:
        self.alive_since[codes.cpu()] = self.step

    def state_dict(self) -> dict[str, Any]:
        return {"last_seen": self.last_seen.tolist(), "alive_since": self.alive_since.tolist(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_seen = torch.tensor(state["last_seen"], dtype=torch.long)
        self.alive_since = torch.tensor(state["alive_since"], dtype=torch.long)
        self.step = int(state["step"])


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def _global_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def train(cfg: TrainVQKDConfig) -> dict[str, Any]:
    """Run (or resume) a training job; returns ``{"step", "start_step", "history": [logged metrics]}``."""
    rank, world, device = init_distributed()
    torch.manual_seed(cfg.run.seed + rank)
    tok_cfg = cfg.tokenizer_config()
    ds = fill_batch_fields(load_ds_config(resolve_ds_config(None, cfg.run.deepspeed_config, default=DS_DEFAULT)), cfg.run.batch_size, world)
    if zero_stage(ds) > 2:
        raise ConfigError(f"run.deepspeed_config: ZeRO stage {zero_stage(ds)} is not supported for the tokenizer "
                          "(the codebook EMA and export need whole parameters); use stage 0-2")
    if ds.get("gradient_accumulation_steps", 1) != 1:
        raise ConfigError("run.deepspeed_config.gradient_accumulation_steps: must be 1 (the codebook EMA runs per step)")
    if not os.path.isfile(cfg.teacher.path):
        raise ConfigError(f"teacher.path={cfg.teacher.path!r}: file not found")

    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    model = VQKD(tok_cfg)
    teacher = build_teacher(cfg.teacher.kind, load_untrusted(cfg.teacher.path),
                            cfg.teacher.beit3_preset).to(device)
    if teacher.out_dim != tok_cfg.teacher_dim:
        raise ConfigError(f"model.teacher_dim={tok_cfg.teacher_dim} but the teacher gives {teacher.out_dim}-d features")
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.lr)
    tb = os.path.join(cfg.run.out_dir, "tensorboard") if cfg.run.tensorboard else None
    engine, _, _ = build_engine(model, ds, groups, cfg.optim, tensorboard_dir=tb, job_name="vqkd")
    vqkd: VQKD = engine.module

    ckpt = CheckpointManager(os.path.join(cfg.run.out_dir, "checkpoints"), cfg.run.keep_last)
    loader = ImageLoader(cfg.data, rank, world, cfg.run.batch_size, with_mask=False)
    usage = CodeUsage(tok_cfg.num_codes, cfg.codebook.usage_window)
    state = ckpt.load(engine)
    step = 0
    if state is not None:
        step = int(state["step"])
        loader.load_state_dict(state["loader"])
        usage.load_state_dict(state["usage"])
    if rank == 0:
        os.makedirs(cfg.run.out_dir, exist_ok=True)
        with open(os.path.join(cfg.run.out_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=1)

    n_params = sum(p.numel() for p in vqkd.parameters())
    t_params = sum(p.numel() for p in teacher.parameters())
    flops_per_image = tok_cfg.num_patches * (6 * n_params + 2 * t_params)  # approx. (no attention term)
    meter = StepMeter(world_size=world)
    total = cfg.optim.total_steps
    history: list[dict[str, Any]] = []
    start_step = step
    acc = {"rec_cos": 0.0, "quant_loss": 0.0, "n": 0}
    reseeded = 0
    logger.info("VQ-KD %s: %.1fM params, teacher %s %.1fM, %d codes, %d ranks x %d images, start step %d of %d",
                cfg.preset, n_params / 1e6, cfg.teacher.kind, t_params / 1e6, tok_cfg.num_codes, world,
                cfg.run.batch_size, step, total)
    with PreemptionGuard() as guard:
        batches = iter(loader)
        while step < total:
            batch = next(batches)
            images = batch["tokenizer_images"].to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=engine.torch_autocast_enabled()):
                feats = teacher(images)  # [B, P, T] fp32
            out = engine(images, feats)
            engine.backward(out.loss)
            engine.step()
            step += 1
            usage.update(step, out.counts)
            if cfg.codebook.reseed_dead:
                dead = usage.dead(cfg.codebook.dead_after_steps)
                if bool(dead.any()):
                    n = vqkd.quantize.reseed_(dead.to(device), out.z, seed=cfg.run.seed * 1_000_003 + step)
                    usage.revive(dead.nonzero().squeeze(1))
                    reseeded += n
            acc["rec_cos"] += 1.0 - float(out.rec_loss.detach())
            acc["quant_loss"] += float(out.quant_loss.detach())
            acc["n"] += 1
            meter.update(images.shape[0], flops_per_image * images.shape[0])
            if step % cfg.run.log_every == 0 or step == total:
                rec_cos, qloss = _global_mean([acc["rec_cos"] / acc["n"], acc["quant_loss"] / acc["n"]], device)
                metrics: dict[str, Any] = {"rec_cos": rec_cos, "quant_loss": qloss, "codes_used": usage.used(),
                           "perplexity": usage.perplexity(), "reseeded": reseeded,
                           "lr": engine.get_lr()[0], **meter.read()}
                log_step(step, metrics)
                history.append({"step": step, **metrics})
                acc = {"rec_cos": 0.0, "quant_loss": 0.0, "n": 0}
            stop = guard.should_stop()
            if stop or step % cfg.run.save_every == 0 or step == total:
                ckpt.save(engine, step, {"step": step, "loader": loader.state_dict(), "usage": usage.state_dict()})
            if stop:
                logger.warning("stopping at step %d on signal %s (checkpoint saved)", step, guard.signum)
                break
    if rank == 0 and step >= total:
        save_tokenizer(vqkd, os.path.join(cfg.run.out_dir, "tokenizer.pt"))
        logger.info("wrote %s", os.path.join(cfg.run.out_dir, "tokenizer.pt"))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return {"step": step, "start_step": start_step, "history": history}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m beit3.pretrain.train_vqkd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML experiment file (TrainVQKDConfig)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                   help="DeepSpeed JSON (or run.deepspeed_config; default vqkd_zero1.json)")
    p.add_argument("--metrics-out", default=None, help="write the logged metrics as JSON (rank 0)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.total_steps=1000")
    args = p.parse_args(argv)
    cfg = load_config(TrainVQKDConfig, args.config, args.overrides)
    cfg.run.deepspeed_config = resolve_ds_config(args.deepspeed_config, cfg.run.deepspeed_config, default=DS_DEFAULT)
    result = train(cfg)
    if args.metrics_out and (not dist.is_initialized() or dist.get_rank() == 0):
        with open(args.metrics_out, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["TrainVQKDConfig", "TeacherConfig", "CodebookConfig", "RunConfig", "CodeUsage", "train", "main"]
