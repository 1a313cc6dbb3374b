"""Typed fine-tuning configuration (YAML + dotted overrides through ``model.config_io``).

One dataclass per concern: ``model`` (backbone preset and weights), ``data`` (index files and
batching), ``optim`` (the shared ``OptimConfig``: AdamW, warmup + cosine; ``total_steps`` is
derived from ``train.epochs`` unless ``train.max_steps`` is set), ``train`` (layer decay, head
lr scale, EMA, DeepSpeed JSON, output), ``mixup`` (classification) and ``generation``
(captioning). Validated once in ``FinetuneConfig.validate(task)`` before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from beit3.model.config import BEiT3Config, ConfigError, get_config
from beit3.pretrain.optim import OptimConfig

from .generation import GenerationConfig
from .losses import MixupConfig

TASK_NAMES = ("classification", "zeroshot", "vqa", "nlvr2", "retrieval", "captioning")
# the official heads that skip the backbone's final LayerNorm
_NO_FINAL_NORM = ("classification", "vqa")


class FinetuneConfigError(ConfigError):
    """A fine-tuning config value is wrong; the message names the field."""


@dataclass
class ModelSection:
    preset: str = "base"
    overrides: dict[str, Any] = field(default_factory=dict)  # BEiT3Config fields (img_size, drop_path_rate ...)
    pretrained: Optional[str] = None  # our export / an official .pth / a task model's weights
    grad_checkpointing: bool = False
    head_init_scale: float = 1e-3  # classification head weights x this (official ImageNet recipe)

    def backbone_config(self, task: str) -> BEiT3Config:
        over = dict(self.overrides)
        over.setdefault("normalize_output", task not in _NO_FINAL_NORM)
        try:
            return get_config(self.preset, **over)
        except ConfigError as e:
            raise FinetuneConfigError(f"model: {e}") from None


@dataclass
class DataSection:
    data_root: str = "."
    train_index: Optional[str] = None
    eval_index: Optional[str] = None
    spm: Optional[str] = None  # SentencePiece model (captioning decode, zero-shot prompts)
    answer_vocab: Optional[str] = None  # VQA answer2label.txt
    classes: Optional[str] = None  # class names, one per line (zero-shot; classification count)
    num_classes: int = 0
    zeroshot_templates: list[str] = field(default_factory=lambda: ["a photo of a {}.", "a picture of a {}."])
    batch_size: int = 32  # per rank
    eval_batch_size: int = 64
    max_text_len: int = 64
    num_workers: int = 2
    crop_scale: tuple[float, float] = (0.5, 1.0)
    skip_bad_rows: bool = False
    caption_mask_prob: float = 0.6


@dataclass
class TrainSection:
    epochs: int = 10
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs for the schedule)
    layer_decay: float = 0.9  # lr x decay^(L + 1 - layer); 1.0 disables
    head_lr_scale: float = 1.0
    ema_decay: float = 0.0  # 0 disables; evaluation then uses the EMA weights
    deepspeed_config: str = "finetune_zero1.json"
    output_dir: str = "runs/finetune"
    keep_checkpoints: int = 2
    save_every_epochs: int = 1
    eval_every_epochs: int = 1
    eval_before_training: bool = False
    resume: bool = False
    log_every: int = 20
    seed: int = 0


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """The shared ``OptimConfig`` with fine-tuning defaults (a partial ``optim`` section in the
    YAML keeps these, not the pretraining ones). ``total_steps`` is replaced by the trainer
    (``train.max_steps`` or ``train.epochs`` x steps per epoch); warmup is checked against it there."""

    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int = 0
    total_steps: int = 2 ** 62


@dataclass
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def validate(self, task: str, eval_only: bool) -> None:
        def fail(name: str, msg: str) -> None:
            raise FinetuneConfigError(f"{name}: {msg}")

        if self.model.head_init_scale <= 0:
            fail("model.head_init_scale", "must be positive")
        if task not in TASK_NAMES:
            fail("task", f"{task!r} is not one of {TASK_NAMES}")
        self.model.backbone_config(task)
        d, t = self.data, self.train
        if not eval_only and task != "zeroshot" and not d.train_index:
            fail("data.train_index", "required for training (or pass --eval)")
        if (eval_only or task == "zeroshot") and not d.eval_index:
            fail("data.eval_index", "required for evaluation")
        if task == "zeroshot" and not eval_only:
            fail("task", "zeroshot only evaluates; pass --eval")
        if task == "vqa" and not d.answer_vocab:
            fail("data.answer_vocab", "VQA needs the answer2label.txt file")
        if task in ("captioning", "zeroshot") and not d.spm:
            fail("data.spm", f"{task} needs the SentencePiece model")
        if task == "classification" and d.num_classes <= 0 and not d.classes:
            fail("data.num_classes", "set it (or data.classes) for classification")
        if task == "zeroshot" and not d.classes:
            fail("data.classes", "zero-shot classification needs the class names file")
        for name in ("batch_size", "eval_batch_size", "max_text_len"):
            if getattr(d, name) <= 0:
                fail(f"data.{name}", "must be positive")
        if d.max_text_len < 3:
            fail("data.max_text_len", "must leave room for BOS, one token and EOS")
        if d.num_workers < 0:
            fail("data.num_workers", "must be >= 0")
        if not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
            fail("data.crop_scale", "must satisfy 0 < lo <= hi <= 1")
        if not 0 < d.caption_mask_prob <= 1:
            fail("data.caption_mask_prob", "must be in (0, 1]")
        if t.epochs <= 0 and t.max_steps <= 0:
            fail("train.epochs", "set epochs or max_steps")
        if t.max_steps < 0:
            fail("train.max_steps", "must be >= 0")
        if not 0 < t.layer_decay <= 1:
            fail("train.layer_decay", "must be in (0, 1]")
        if t.head_lr_scale <= 0:
            fail("train.head_lr_scale", "must be positive")
        if not 0 <= t.ema_decay < 1:
            fail("train.ema_decay", "must be in [0, 1)")
        for name in ("keep_checkpoints", "save_every_epochs", "eval_every_epochs", "log_every"):
            if getattr(t, name) < 1:
                fail(f"train.{name}", "must be >= 1")
        from beit3.pretrain.engine import load_ds_config, zero_stage

        try:
            stage = zero_stage(load_ds_config(t.deepspeed_config))
        except ConfigError as e:
            fail("train.deepspeed_config", str(e))
        if t.ema_decay > 0 and stage == 3:
            fail("train.ema_decay", "EMA needs full parameters on each rank; use a ZeRO-1/2 deepspeed_config")
        if self.mixup.active and task != "classification":
            fail("mixup", "mixup/cutmix apply to classification only")


__all__ = ["FinetuneConfig", "FinetuneConfigError", "ModelSection", "DataSection", "TrainSection", "TASK_NAMES"]
