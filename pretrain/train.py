"""BEiT-3 pretraining with DeepSpeed: masked data modeling over images, texts and pairs.

    deepspeed [--hostfile H] pretrain/train.py --config exp.yaml \
        --deepspeed_config ds_configs/zero3_bf16.json [dotted.key=value ...]

Everything that can be checked is checked before DeepSpeed starts: the experiment config
(unknown keys, values), the batch arithmetic against world size and accumulation, shard paths,
the SentencePiece model and the image tokenizer. Checkpoints are sharded DeepSpeed
checkpoints written crash-safely every ``run.save_every`` steps and on SIGTERM/SIGINT;
``run.resume=auto`` continues from the newest complete one, also on another world size.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from beit3.data_pipeline import DataConfig, PretrainLoader, TextTokenizer, check_batch_arithmetic, resolve_shards
from beit3.model import BEiT3ForPretraining, get_config
from beit3.model.config import BEiT3Config, ConfigError

from beit3.runtime.checkpointing import CheckpointManager, PreemptionGuard, check_ds_config
from beit3.runtime.entry import run_main
from beit3.runtime.faults import FaultInjector
from beit3.runtime.run_config import RunSection
from beit3.runtime.guard import DivergenceGuard, GuardConfig
from beit3.runtime.loop import GuardedLoop
from beit3.runtime.watchdog import HangWatchdog, exit_within
from beit3.model.config_io import load_config, to_dict
from beit3.runtime.engine import (build_engine, check_code_settings, code_settings, resolve_ds_config, engine_dtype,
                                   fill_batch_fields, grad_accum_steps, init_distributed, load_ds_config, zero_stage)
from beit3.pretrain.feed import feed_warning
from beit3.pretrain.objective import mdm_loss
from beit3.runtime.optim import OptimConfig, param_groups
from beit3.runtime.save_interval import AutoSaveInterval
from beit3.runtime.telemetry import StepMeter, device_peak_tflops, get_logger, log_step, read_scalars

logger = get_logger("beit3.pretrain")

STAGES = ("joint", "vision", "language")


@dataclass
class ModelSection:
    """Model preset plus overrides of ``BEiT3Config`` fields (e.g. ``layout: paper``)."""

    preset: str = "base"
    overrides: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile every block in place (inductor; per-mode and packed paths)

    def build_config(self) -> BEiT3Config:
        return get_config(self.preset, **self.overrides)

    def apply(self, model: BEiT3ForPretraining) -> BEiT3ForPretraining:
        """Activation checkpointing and per-block compile as this section says (before DeepSpeed wraps it)."""
        if self.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if self.compile:
            model.beit3.compile_blocks()
        return model


@dataclass
class TargetsConfig:
    """Where MIM targets come from: a frozen VQ-KD tokenizer checkpoint (online), unless the
    shards carry precomputed codes (``data.offline_codes``)."""

    tokenizer_path: str = ""


@dataclass
class RunConfig(RunSection):
    """The shared run section (``runtime.run_config.RunSection``) plus pretraining's own fields."""

    max_steps: Optional[int] = None  # stop after this many steps (default: optim.total_steps)
    save_every: Union[int, str] = 1000  # steps, or "auto": Young/Daly from the first save's cost (docs/planning.md)
    save_auto_first: int = 100  # save_every=auto: steps before the measured first save
    mtbf_hours: Optional[float] = None  # save_every=auto: the job's MTBF (default: Llama 3's per-GPU rate x GPUs)
    async_save: bool = False  # write checkpoint shards in a background thread while training continues
    peak_tflops: Optional[float] = None  # MFU denominator; default: the detected GPU's bf16 peak
    stage: str = "joint"  # joint | vision | language (VLMo-style staged pretraining, see README)

    def __post_init__(self) -> None:
        if isinstance(self.save_every, str) and self.save_every != "auto":
            raise ConfigError(f"run.save_every={self.save_every!r}: must be a number of steps or 'auto'")
        super().__post_init__()
        if self.mtbf_hours is not None and self.mtbf_hours <= 0:
            raise ConfigError(f"run.mtbf_hours={self.mtbf_hours}: must be > 0")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"run.max_steps={self.max_steps}: must be >= 1")
        if self.stage not in STAGES:
            raise ConfigError(f"run.stage={self.stage!r}: must be one of {STAGES}")

    def _at_least_one(self) -> tuple[str, ...]:
        return ("log_every", "keep_last", "save_auto_first") + (() if self.save_every == "auto" else ("save_every",))


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)


# ---- start-up checks (no distributed state, no GPU) ---------------------------------------------
def stage_sources(stage: str) -> tuple[str, ...]:
    return {"joint": ("image", "text", "pair"), "vision": ("image",), "language": ("text",)}[stage]


def stage_trainable(stage: str, name: str) -> bool:
    """Which parameters a stage updates (others get lr 0): VLMo's vision stage trains
    everything an image touches; the language stage only the language experts, text embeddings
    and the MLM head (attention and vision experts frozen); joint trains all."""
    if stage != "language":
        return True
    return (".language." in name or "text_embed" in name or "text_pos" in name or name.startswith("mlm_head")
            or name.startswith("beit3.norm.language"))


def validate(cfg: TrainConfig, ds: dict[str, Any], world_size: int) -> tuple[BEiT3Config, dict[str, int]]:
    """Every check that needs no GPU: returns the model config and per-rank micro-batch sizes."""
    model_cfg = cfg.model.build_config()
    data = cfg.data
    if cfg.model.compile and zero_stage(ds) == 3 and os.environ.get("BEIT3_ALLOW_COMPILE_ZERO3") != "1":
        # measured: bench/results/compile_zero3.md (bench/compile.py --deepspeed lifts it to measure)
        raise ConfigError("model.compile=true with zero_optimization.stage=3: ZeRO-3's parameter hooks break "
                          "every compiled block's graph (slower than eager); compile with ZeRO stage 1 or 2")
    if stage_sources(cfg.run.stage) != ("image", "text", "pair"):
        missing = [s for s in stage_sources(cfg.run.stage) if data.count(s) == 0]
        if missing:
            raise ConfigError(f"run.stage={cfg.run.stage!r} needs data for {missing}")
    if data.img_size != model_cfg.img_size:
        raise ConfigError(f"data.img_size={data.img_size} != model img_size={model_cfg.img_size} "
                          f"(set model.overrides.img_size or data.img_size)")
    if data.patch_size != model_cfg.patch_size:
        raise ConfigError(f"data.patch_size={data.patch_size} != model patch_size={model_cfg.patch_size}")
    longest = max(data.max_text_len if data.texts else 0, data.max_pair_text_len if data.pairs else 0)
    if longest + 2 > model_cfg.max_text_positions:
        raise ConfigError(f"data.max_text_len/max_pair_text_len={longest} needs model max_text_positions >= "
                          f"{longest + 2}, it is {model_cfg.max_text_positions}")
    check_ds_config(ds)
    check_code_settings(ds, code_settings(cfg.optim, cfg.run.tensorboard_dir()))
    accum = grad_accum_steps(ds)
    per_rank = check_batch_arithmetic(data, world_size, accum)
    data.require_inputs()
    for source in data.active_sources:  # every pattern must match readable shards, now
        resolve_shards(data.shards(source), f"data.{source}_shards")
    if data.texts or data.pairs:
        tok = TextTokenizer(data.spm_path)
        if tok.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"data.spm_path has {tok.vocab_size} ids but model vocab_size={model_cfg.vocab_size}")
    needs_tokenizer = (data.images or data.pairs) and not data.offline_codes
    if needs_tokenizer:
        path = cfg.targets.tokenizer_path
        if not Path(path).is_file():
            raise ConfigError(f"targets.tokenizer_path={path!r}: a VQ-KD tokenizer checkpoint is needed for "
                              "online MIM targets (or set data.offline_codes=true with coded shards)")
        from beit3.model.vqkd import load_tokenizer

        tok = load_tokenizer(path).config
        if tok.num_codes != model_cfg.num_visual_tokens:
            raise ConfigError(f"targets.tokenizer_path has {tok.num_codes} codes but model num_visual_tokens="
                              f"{model_cfg.num_visual_tokens} (set model.overrides.num_visual_tokens)")
        if tok.num_patches != model_cfg.num_patches:
            raise ConfigError(f"targets.tokenizer_path has a {tok.grid_size}x{tok.grid_size} patch grid, the model "
                              f"{model_cfg.grid_size}x{model_cfg.grid_size}")
    if short := feed_warning(model_cfg, data, world_size, cfg.run.peak_tflops or device_peak_tflops()):
        logger.warning(short)  # a warning: the rates are another machine's; the run may still be right
    return model_cfg, per_rank


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="BEiT-3 pretraining (DeepSpeed)")
    ap.add_argument("--config", help="experiment YAML (TrainConfig)")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                    help="DeepSpeed JSON, a path or a file name in ds_configs/ (or run.deepspeed_config; "
                         "default zero3_bf16.json)")
    ap.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    ap.add_argument("--validate-only", action="store_true", help="check the configuration and exit")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the YAML")
    return ap.parse_args(argv)


# ---- RNG ------------------------------------------------------------------------------------------
def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---- the job --------------------------------------------------------------------------------------
class Pretrainer(GuardedLoop):
    """Owns the engine, loader, targets and checkpoints of one run."""

    def __init__(self, cfg: TrainConfig, ds: dict[str, Any], model_cfg: BEiT3Config, per_rank: dict[str, int]) -> None:
        self.cfg = cfg
        self.rank, self.world, _ = init_distributed(timeout_s=cfg.run.dist_timeout_s + 60,
                                                    trace_dir=str(Path(cfg.run.output_dir) / "hang"))
        self.accum = grad_accum_steps(ds)
        ds = fill_batch_fields(ds, sum(per_rank.values()), self.world)
        seed_all(cfg.run.seed * 1000 + self.rank)
        model = cfg.model.apply(BEiT3ForPretraining(model_cfg))
        self.model_cfg = model_cfg
        groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.lr)
        groups = self._stage_groups(model, groups)
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        logger.info("rank %d of world size %d, %d micro-step(s) per optimizer step", self.rank, self.world, self.accum)
        self.engine, self.optimizer, self.scheduler = build_engine(model, ds, groups, cfg.optim,
                                                                   tensorboard_dir=cfg.run.tensorboard_dir())
        self.device = self.engine.device
        self.float_dtype = engine_dtype(self.engine)
        self.loader = PretrainLoader(cfg.data, self.rank, self.world, self.accum)
        self.ckpt = CheckpointManager(str(out / "checkpoints"), keep_last=cfg.run.keep_last,
                                      async_save=cfg.run.async_save)
        self.targets = self._build_targets()
        self.step = 0
        self.guard = DivergenceGuard(cfg.guard, self.world)
        self.faults = FaultInjector(str(out), self.rank)
        self.watchdog = HangWatchdog(str(out), self.rank, self.world, cfg.run.dist_timeout_s).start()
        self.autosave: Optional[AutoSaveInterval] = None

    def _stage_groups(self, model: torch.nn.Module, groups: list[dict]) -> list[dict]:
        """Split groups so that parameters a stage freezes get lr 0 (VLMo-style staging)."""
        if self.cfg.run.stage == "joint":
            return groups
        names = {id(p): n for n, p in model.named_parameters()}
        out = []
        for g in groups:
            for trainable in (True, False):
                params = [p for p in g["params"] if stage_trainable(self.cfg.run.stage, names[id(p)]) == trainable]
                if params:
                    scale = g["lr_scale"] if trainable else 0.0
                    out.append({**g, "params": params, "lr": self.cfg.optim.lr * scale, "lr_scale": scale})
        return out

    def _build_targets(self):
        data = self.cfg.data
        if not (data.images or data.pairs) or data.offline_codes:
            return None
        from beit3.pretrain.targets import VisualTokenTargets

        return VisualTokenTargets.from_checkpoint(self.cfg.targets.tokenizer_path, device=self.device)

    # ---- state --------------------------------------------------------------------------------
    def client_state(self) -> dict[str, Any]:
        return {"step": self.step, "config": to_dict(self.cfg), "loader": self.loader.state_dict(),
                "rng": rng_state(), "world_size": self.world, "guard": self.guard.state_dict(),
                "save_every_auto": self.autosave.steps if self.autosave else None}

    def resume(self) -> None:
        if self.resume_checkpoint():
            logger.info("resumed at step %d", self.step)

    def _restore(self, state: dict[str, Any], rollback: bool = False) -> None:
        self.step = int(state["step"])
        self.loader.load_state_dict(state["loader"])
        if state.get("world_size") == self.world and "rng" in state:
            set_rng_state(state["rng"])
        else:  # another world size: per-rank RNG streams cannot carry over; derive them from the step
            seed_all(self.cfg.run.seed * 1000 + self.rank + 7919 * self.step)
        self.guard.load_state_dict(state.get("guard", {}), rollback=rollback)
        self._resume_autosave(state.get("save_every_auto"))

    def save(self) -> None:
        self.ckpt.save(self.engine, self.step, self.client_state())

    # ---- run.save_every: auto ------------------------------------------------------------------
    def _start_autosave(self) -> None:
        """Before the loop: the measured interval of a resumed run, else the first save after
        ``run.save_auto_first`` steps from here."""
        if self.cfg.run.save_every == "auto" and self.autosave is None:
            self.autosave = AutoSaveInterval.for_gpus(self.world, self.cfg.run.mtbf_hours,
                                                      first_save_step=self.step + self.cfg.run.save_auto_first)

    def _resume_autosave(self, steps: Optional[int]) -> None:
        if self.cfg.run.save_every == "auto" and steps:
            self._start_autosave()
            self.autosave.steps, self.autosave.anchor = int(steps), self.step

    def save_due(self) -> bool:
        every = self.cfg.run.save_every
        return self.autosave.due(self.step) if every == "auto" else self.step % every == 0

    def _measure_autosave(self, save_s: float, step_s: float) -> None:
        """After the first save of ``save_every: auto``: every rank takes the slowest rank's save
        and step seconds (one all-reduce, once per run), so all agree on the interval."""
        import torch.distributed as dist

        t = torch.tensor([save_s, step_s], dtype=torch.float64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        logger.info(self.autosave.record(float(t[0]), float(t[1]), step=self.step))

    # ---- loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        max_steps = cfg.run.max_steps or cfg.optim.total_steps
        meter = StepMeter(self.world, cfg.run.peak_tflops)
        batches = iter(self.loader)
        last: dict[str, float] = {}
        sums: dict[str, torch.Tensor] = {}
        n_micro = 0
        self.engine.train()
        self._start_autosave()
        started, first_step = time.monotonic(), self.step
        with PreemptionGuard() as guard:
            try:
                while self.step < max_steps:
                    if self.guard.next_data_step(self.step + 1) != self.step + 1:
                        batches = self._seek(batches, self.guard.next_data_step(self.step + 1) - 1)
                        continue
                    self.watchdog.beat(self.step + 1)
                    self.faults.at_step_start(self.step + 1)
                    batch, samples, step_flops = self._train_step(batches, sums)
                    n_micro += self.accum
                    self.step += 1
                    if self.guard.end_step(self.step, self.engine.was_step_applied()):
                        batches = self._rollback(batches)
                        sums, n_micro = {}, 0
                        continue
                    meter.update(samples * self.accum, step_flops)
                    if self.step % cfg.run.log_every == 0 or self.step == max_steps:
                        last = read_scalars({k: v / n_micro for k, v in sums.items()})  # the step's one read
                        self._log(last, meter, batch["stats"])
                        sums, n_micro = {}, 0
                    self.ckpt.poll()  # marks a background save complete once every rank's files are durable
                    with self.watchdog.waiting():  # a host sync: under NCCL, where a rank waits for a stalled peer
                        stop = guard.should_stop()
                    if self.save_due() or stop or self.step == max_steps:
                        measure = self.autosave is not None and self.autosave.steps is None and self.save_due()
                        t0 = time.monotonic()
                        self.save()
                        if measure:
                            self._measure_autosave(time.monotonic() - t0, (t0 - started) / (self.step - first_step))
                        self.watchdog.beat(self.step + 1)
                    if stop:
                        logger.warning("stopping at step %d on signal %s after saving", self.step, guard.signum)
                        break
            finally:
                self.watchdog.stop()
                batches.close()
                self.loader.close()  # loader workers end now, not at interpreter exit
        self.ckpt.finalize()  # the last save is complete before the job exits
        self.ckpt.raise_if_unsaved()
        return last

    def _train_step(self, batches: Any, sums: dict[str, torch.Tensor]) -> tuple[dict[str, Any], int, float]:
        """One optimizer step (``accum`` micro-steps), guarded; adds the micro metrics to ``sums``.
        Returns the last micro-batch, the samples of one micro-step and this rank's real-token
        model FLOPs of the step (padding not counted)."""
        flops = 0.0
        sources = stage_sources(self.cfg.run.stage)
        for _ in range(self.accum):
            batch = next(batches)
            micro = {s: batch[s] for s in sources if s in batch}
            result = mdm_loss(self.engine, micro, self.targets, self.device, self.float_dtype)
            result.loss = self.faults.corrupt_loss(result.loss, self.step + 1)
            self.engine.backward(self.guard.check_micro(result.loss, self.step + 1))
            with self.watchdog.waiting():  # DeepSpeed's skip decision reads the global gradient norm
                self.engine.step()
            flops += result.flops
            for k, v in result.metric_tensors().items():  # summed on the device, read when logged
                sums[k] = sums.get(k, 0.0) + v
        samples = sum(len(b["sample_ids"]) for b in micro.values())
        return batch, samples, flops

    def _log(self, metrics: dict[str, float], meter: StepMeter, stats: dict[str, int]) -> None:
        line = dict(metrics)
        line["lr"] = self.scheduler.get_last_lr()[0]
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            line["grad_norm"] = float(gn)
        line.update(meter.read())
        line.update(self.guard.metrics())
        line["skipped"] = {k: v for k, v in stats.items() if v and not k.startswith("cache/")}
        cache = {k[6:]: v for k, v in stats.items() if k.startswith("cache/")}  # remote shard downloads/hits
        if cache:
            line["remote_cache"] = cache
        log_step(self.step, line, logger)
        if self.rank == 0:  # machine-readable history (one JSON line per logging step)
            with open(Path(self.cfg.run.output_dir) / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **line}) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            monitor.write_events([(f"train/{k}", v, self.step) for k, v in line.items() if isinstance(v, (int, float))])


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    args = parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    cfg.run.deepspeed_config = resolve_ds_config(args.deepspeed_config, cfg.run.deepspeed_config,
                                                 default="zero3_bf16.json")
    ds = load_ds_config(cfg.run.deepspeed_config)
    world = int(os.environ.get("WORLD_SIZE", 1))
    model_cfg, per_rank = validate(cfg, ds, world)
    if args.validate_only:
        logger.info("configuration is valid: model %s, per-rank micro-batch %s", cfg.model.preset, per_rank)
        return {}
    job = Pretrainer(cfg, ds, model_cfg, per_rank)
    job.resume()
    return job.train()


def run(argv: list[str]) -> int:
    """``main`` as a process: the exit code (``beit3.runtime.entry``: 0, 2 configuration error, 3 diverged,
    5 the last checkpoint could not be written for lack of space, 1 other error)."""
    return run_main(main, argv)


if __name__ == "__main__":
    exit_within(run(sys.argv[1:]))  # a shutdown that hangs still ends, with its stacks on stderr
