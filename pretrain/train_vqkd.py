"""Train the VQ-KD image tokenizer with DeepSpeed on image shards.

    deepspeed --num_gpus 8 -m beit3.pretrain.train_vqkd --config vqkd.yaml \\
        data.image_shards=[/data/in21k/manifest.json] teacher.path=/weights/clip_vit_b16.pt

The decoder output regresses a frozen teacher's patch features by cosine distance; the
codebook follows the EMA of its assigned encoder vectors (all-reduced). Dead codes are avoided
by k-means initialisation on the first batch and (``codebook.reseed_dead``) re-seeding
codes unused for ``codebook.dead_after_steps`` steps with encoder vectors of the current batch.
Logs: reconstruction cosine, quantizer loss, codes used in the last ``codebook.usage_window``
steps, perplexity, re-seeded codes (also ``{run.output_dir}/metrics.jsonl``). The loop runs on the
shared run-time (``VQKDTrainer``): verified checkpoints and ``run.resume``, the divergence guard,
the hang watchdog, preemption, exit codes the supervisor understands; at the end rank 0 writes
``{run.output_dir}/tokenizer.pt``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
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
from beit3.runtime.entry import run_main
from beit3.runtime.faults import FaultInjector
from beit3.runtime.guard import DivergenceGuard, SkipGuardConfig
from beit3.runtime.loop import GuardedLoop
from beit3.runtime.watchdog import HangWatchdog, exit_within
from beit3.model.config_io import load_config, to_dict
from beit3.runtime.engine import (build_engine, fill_batch_fields, init_distributed, load_ds_config,
                                  resolve_ds_config, zero_stage)
from beit3.runtime.optim import OptimConfig, param_groups
from beit3.runtime.run_config import RunSection
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
class RunConfig(RunSection):
    """The shared run section (``runtime.run_config.RunSection``) plus the images per rank."""

    output_dir: str = "runs/vqkd"
    deepspeed_config: str = ""  # twin of --deepspeed_config; default vqkd_zero1.json
    batch_size: int = 64  # images per rank per step
    tensorboard: bool = False

    def _at_least_one(self) -> tuple[str, ...]:
        return ("batch_size",) + super()._at_least_one()


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
    guard: SkipGuardConfig = field(default_factory=SkipGuardConfig)

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


class VQKDTrainer(GuardedLoop):
    """One tokenizer run on the shared run-time: engine, loader, checkpoints, the divergence guard
    (``guard.*``; spikes off by default), the hang watchdog (``run.dist_timeout_s``), preemption and
    fault injection, like pretraining; ``run.resume`` picks the checkpoint."""

    def __init__(self, cfg: TrainVQKDConfig) -> None:
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed(timeout_s=cfg.run.dist_timeout_s + 60,
                                                              trace_dir=os.path.join(cfg.run.output_dir, "hang"))
        tok_cfg = self.tok_cfg = cfg.tokenizer_config()
        ds = fill_batch_fields(load_ds_config(resolve_ds_config(None, cfg.run.deepspeed_config, default=DS_DEFAULT)),
                               cfg.run.batch_size, self.world)
        _check_run(cfg, ds)
        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
        model = VQKD(tok_cfg)
        self.teacher = build_teacher(cfg.teacher.kind, load_untrusted(cfg.teacher.path),
                                     cfg.teacher.beit3_preset).to(self.device)
        if self.teacher.out_dim != tok_cfg.teacher_dim:
            raise ConfigError(f"model.teacher_dim={tok_cfg.teacher_dim} but the teacher gives "
                              f"{self.teacher.out_dim}-d features")
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.lr)
        self.engine, _, _ = build_engine(model, ds, groups, cfg.optim, tensorboard_dir=cfg.run.tensorboard_dir(),
                                         job_name="vqkd")
        self.vqkd: VQKD = self.engine.module
        os.makedirs(cfg.run.output_dir, exist_ok=True)
        self.ckpt = CheckpointManager(os.path.join(cfg.run.output_dir, "checkpoints"), cfg.run.keep_last)
        self.loader = ImageLoader(cfg.data, self.rank, self.world, cfg.run.batch_size, with_mask=False)
        self.usage = CodeUsage(tok_cfg.num_codes, cfg.codebook.usage_window)
        self.guard = DivergenceGuard(cfg.guard, self.world)
        self.faults = FaultInjector(cfg.run.output_dir, self.rank)
        self.step = self.start_step = 0
        self.reseeded = 0
        self.history: list[dict[str, Any]] = []

    # ---- state ----------------------------------------------------------------------------------
    def client_state(self) -> dict[str, Any]:
        return {"step": self.step, "loader": self.loader.state_dict(), "usage": self.usage.state_dict(),
                "guard": self.guard.state_dict()}

    def _restore(self, state: dict[str, Any], rollback: bool = False) -> None:
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        self.usage.load_state_dict(state["usage"])
        self.guard.load_state_dict(state.get("guard", {}), rollback=rollback)

    def resume(self) -> None:
        self.resume_checkpoint()
        self.start_step = self.step
        if self.rank == 0:
            with open(os.path.join(self.cfg.run.output_dir, "config.json"), "w") as f:
                json.dump(to_dict(self.cfg), f, indent=1)

    # ---- loop -----------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg, total = self.cfg, self.cfg.optim.total_steps
        n_params = sum(p.numel() for p in self.vqkd.parameters())
        t_params = sum(p.numel() for p in self.teacher.parameters())
        flops_per_image = self.tok_cfg.num_patches * (6 * n_params + 2 * t_params)  # approx. (no attention term)
        meter, acc = StepMeter(world_size=self.world), {"rec_cos": 0.0, "quant_loss": 0.0, "n": 0}
        logger.info("VQ-KD %s: %.1fM params, teacher %s %.1fM, %d codes, %d ranks x %d images, start step %d of %d",
                    cfg.preset, n_params / 1e6, cfg.teacher.kind, t_params / 1e6, self.tok_cfg.num_codes, self.world,
                    cfg.run.batch_size, self.step, total)
        watchdog = self.watchdog = HangWatchdog(cfg.run.output_dir, self.rank, self.world, cfg.run.dist_timeout_s).start()
        batches = iter(self.loader)
        with PreemptionGuard() as signals:
            try:
                while self.step < total:
                    if self.guard.next_data_step(self.step + 1) != self.step + 1:  # a rolled-back streak's data
                        batches = self._seek(batches, self.guard.next_data_step(self.step + 1) - 1)
                        continue
                    watchdog.beat(self.step + 1)
                    self.faults.at_step_start(self.step + 1)
                    out, images = self._step(next(batches))
                    if self.guard.end_step(self.step, self.engine.was_step_applied()):
                        batches = self._rollback(batches)
                        acc = {"rec_cos": 0.0, "quant_loss": 0.0, "n": 0}
                        continue
                    self._book(out, acc)
                    meter.update(images, flops_per_image * images)
                    if self.step % cfg.run.log_every == 0 or self.step == total:
                        self._log(acc, meter)
                        acc = {"rec_cos": 0.0, "quant_loss": 0.0, "n": 0}
                    with watchdog.waiting():
                        stop = signals.should_stop()
                    if stop or self.step % cfg.run.save_every == 0 or self.step == total:
                        self.ckpt.save(self.engine, self.step, self.client_state())
                        watchdog.beat(self.step + 1)
                    if stop:
                        logger.warning("stopping at step %d on signal %s (checkpoint saved)", self.step, signals.signum)
                        break
            finally:
                watchdog.stop()
                self.loader.close()  # its workers end now, not at interpreter exit
        return self._finish()

    def _step(self, batch: dict[str, Any]) -> tuple[Any, int]:
        """Optimizer step ``self.step + 1`` on one batch (guarded); the model output and the images."""
        images = batch["tokenizer_images"].to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16,
                            enabled=self.engine.torch_autocast_enabled()):
            feats = self.teacher(images)  # [B, P, T] fp32
        out = self.engine(images, feats)
        loss = self.faults.corrupt_loss(out.loss, self.step + 1)
        self.engine.backward(self.guard.check_micro(loss, self.step + 1))
        with self.watchdog.waiting():  # DeepSpeed's skip decision reads the global gradient norm
            self.engine.step()
        self.step += 1
        return out, images.shape[0]

    def _book(self, out: Any, acc: dict[str, float]) -> None:
        """An applied step: code usage, dead-code re-seeding, the metric sums."""
        self.usage.update(self.step, out.counts)
        if self.cfg.codebook.reseed_dead:
            dead = self.usage.dead(self.cfg.codebook.dead_after_steps)
            if bool(dead.any()):
                n = self.vqkd.quantize.reseed_(dead.to(self.device), out.z, seed=self.cfg.run.seed * 1_000_003 + self.step)
                self.usage.revive(dead.nonzero().squeeze(1))
                self.reseeded += n
        acc["rec_cos"] += 1.0 - float(out.rec_loss.detach())
        acc["quant_loss"] += float(out.quant_loss.detach())
        acc["n"] += 1

    def _log(self, acc: dict[str, float], meter: StepMeter) -> None:
        rec_cos, qloss = _global_mean([acc["rec_cos"] / acc["n"], acc["quant_loss"] / acc["n"]], self.device)
        metrics: dict[str, Any] = {"loss": 1.0 - rec_cos + qloss, "rec_cos": rec_cos, "quant_loss": qloss,
                                   "codes_used": self.usage.used(), "perplexity": self.usage.perplexity(),
                                   "reseeded": self.reseeded, "lr": self.engine.get_lr()[0], **meter.read(),
                                   **self.guard.metrics()}
        log_step(self.step, metrics)
        self.history.append({"step": self.step, **metrics})
        if self.rank == 0:  # machine-readable history (one JSON line per logging step), as pretraining writes
            with open(os.path.join(self.cfg.run.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")

    def _finish(self) -> dict[str, Any]:
        if self.rank == 0 and self.step >= self.cfg.optim.total_steps:
            save_tokenizer(self.vqkd, os.path.join(self.cfg.run.output_dir, "tokenizer.pt"))
            logger.info("wrote %s", os.path.join(self.cfg.run.output_dir, "tokenizer.pt"))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        return {"step": self.step, "start_step": self.start_step, "history": self.history}


def _check_run(cfg: TrainVQKDConfig, ds: dict[str, Any]) -> None:
    if zero_stage(ds) > 2:
        raise ConfigError(f"run.deepspeed_config: ZeRO stage {zero_stage(ds)} is not supported for the tokenizer "
                          "(the codebook EMA and export need whole parameters); use stage 0-2")
    if ds.get("gradient_accumulation_steps", 1) != 1:
        raise ConfigError("run.deepspeed_config.gradient_accumulation_steps: must be 1 (the codebook EMA runs per step)")
    if not os.path.isfile(cfg.teacher.path):
        raise ConfigError(f"teacher.path={cfg.teacher.path!r}: file not found")


def train(cfg: TrainVQKDConfig) -> dict[str, Any]:
    """Run (or resume) a training job; returns ``{"step", "start_step", "history": [logged metrics]}``."""
    job = VQKDTrainer(cfg)
    job.resume()
    return job.train()


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


if __name__ == "__main__":  # exit codes of beit3.runtime.entry; a shutdown that hangs still ends
    exit_within(run_main(main, sys.argv[1:]))


__all__ = ["TrainVQKDConfig", "TeacherConfig", "CodebookConfig", "RunConfig", "CodeUsage", "VQKDTrainer", "train", "main"]
