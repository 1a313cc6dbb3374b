"""Typed fine-tuning configuration (YAML + dotted overrides through ``model.config_io``).

One dataclass per concern: ``model`` (backbone preset and weights), ``data`` (index files and
batching), ``optim`` (the shared ``OptimConfig``: AdamW, warmup + cosine; ``total_steps`` is
derived from ``train.epochs`` unless ``train.max_steps`` is set), ``run`` (the run section of every
trainer, ``runtime.run_config.RunSection``: output, DeepSpeed JSON, saves, resume, seed, log cadence,
hang timeout, plus the epoch cadence of saves), ``train`` (epochs, layer decay, head lr scale, EMA,
effective batch, warmup in epochs, evaluation cadence), ``guard`` (the shared divergence guard, spikes off by default), ``mixup``
(classification), ``generation`` and ``caption_loss`` (captioning), and ``recipe`` (where an
official recipe in ``finetune/configs`` comes from). Validated once in
``FinetuneConfig.validate(task)`` before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from beit3.model.config import BEiT3Config, ConfigError, get_config
from beit3.runtime.guard import SkipGuardConfig
from beit3.runtime.optim import OptimConfig
from beit3.runtime.run_config import RunSection

from .generation import GenerationConfig
from .losses import CaptionLossConfig, MixupConfig

TASK_NAMES = ("classification", "zeroshot", "vqa", "nlvr2", "retrieval", "captioning")
# the official heads that skip the backbone's final LayerNorm
_NO_FINAL_NORM = ("classification", "vqa")


class FinetuneConfigError(ConfigError):
    """A fine-tuning config value is wrong; the message names the field."""


DS_DEFAULT = "zero1_bf16.json"  # the DeepSpeed JSON when neither --deepspeed_config nor run.deepspeed_config names one


@dataclass
class ModelSection:
    preset: str = "base"
    overrides: dict[str, Any] = field(default_factory=dict)  # BEiT3Config fields (img_size, drop_path_rate ...)
    pretrained: Optional[str] = None  # our export / an official .pth / a task model's weights
    grad_checkpointing: bool = False
    head_init_scale: float = 1e-3  # classification head weights x this (official ImageNet recipe)
    strict_load: bool = False  # every task-model tensor must come from model.pretrained, none left over

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
    zeroshot_prompts: str = "templates"  # or a set of ``prompts``: names, clip80 (CLIP's ensemble), clip7
    batch_size: int = 32  # per rank
    eval_batch_size: int = 64
    max_text_len: int = 64
    num_workers: int = 2
    crop_scale: tuple[float, float] = (0.5, 1.0)
    train_flip: Optional[bool] = None  # horizontal flip of training views; None: classification only
    skip_bad_rows: bool = False
    caption_mask_prob: float = 0.6
    caption_mask_style: str = "mask"  # "official": round(L p) tokens, 80% [MASK] / 10% kept / 10% random
    randaug: bool = False  # RandAugment on training views (official VQAv2 / captioning recipes)
    randaug_num_ops: int = 2  # official RandomAugment(2, 7)
    randaug_magnitude: int = 7  # out of 10 (torchvision bins 0..10)
    normalize: str = "inception"  # mean = std = 0.5 (official VL tasks); "imagenet" (official ImageNet)
    eval_center_crop: bool = False  # eval view: shorter side resize + center crop (official ImageNet)
    train_transform: str = "beit3"  # crop/flip/randaug; "timm_imagenet": official ImageNet view (needs timm)


@dataclass
class TrainSection:
    epochs: int = 10
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs for the schedule)
    warmup_epochs: float = 0.0  # > 0: optim.warmup_steps = warmup_epochs x optimizer steps per epoch
    effective_batch: int = 0  # > 0: samples per optimizer step; data.batch_size caps the micro batch
    layer_decay: float = 0.9  # lr x decay^(L + 1 - layer); 1.0 disables
    head_lr_scale: float = 1.0
    ema_decay: float = 0.0  # 0 disables; evaluation then uses the EMA weights
    eval_every_epochs: int = 1
    eval_before_training: bool = False

    # the run section's fields, under train.* before it was shared (a config naming one is refused)
    MOVED: ClassVar[dict[str, str]] = {
        "deepspeed_config": "run.deepspeed_config", "output_dir": "run.output_dir", "keep_checkpoints": "run.keep_last",
        "save_every_epochs": "run.save_every_epochs", "save_every_steps": "run.save_every",
        "resume": "run.resume (auto | none | a tag)", "log_every": "run.log_every", "seed": "run.seed",
        "dist_timeout_s": "run.dist_timeout_s"}


@dataclass
class RunConfig(RunSection):
    """The shared run section (``runtime.run_config.RunSection``) with fine-tuning's defaults and its
    epoch cadence of saves: a checkpoint at every ``save_every_epochs``-th epoch end, at the last
    step, and every ``save_every`` optimizer steps when that is > 0 (resumable mid-epoch)."""

    output_dir: str = "runs/finetune"
    deepspeed_config: str = ""  # twin of --deepspeed_config; default zero1_bf16.json (DS_DEFAULT)
    save_every: int = 0  # optimizer steps between mid-epoch checkpoints; 0: epoch ends only
    save_every_epochs: int = 1
    keep_last: int = 2
    log_every: int = 20
    tensorboard: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.save_every < 0:
            raise FinetuneConfigError(f"run.save_every={self.save_every}: must be >= 0 (0: epoch ends only)")

    def _at_least_one(self) -> tuple[str, ...]:
        return ("log_every", "keep_last", "save_every_epochs")


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
class RecipeSection:
    """Where a recipe comes from (metadata, not used by training): the official run it
    reproduces (``gpus x batch_per_gpu x update_freq`` = ``train.effective_batch``) and the
    numbers it should reach."""

    name: str = ""
    task: str = ""  # the task the recipe is for (checked against the command line's)
    source: str = ""  # the official document of the recipe
    gpus: int = 0
    batch_per_gpu: int = 0
    update_freq: int = 1
    expected: dict[str, float] = field(default_factory=dict)  # official results (metric -> value)


def plan_batch(effective: int, max_micro: int, world_size: int) -> tuple[int, int]:
    """``(micro batch per rank, gradient accumulation steps)`` giving ``effective`` samples per
    optimizer step on ``world_size`` ranks with micro batches of at most ``max_micro``: the
    fewest accumulation steps, then the micro batch that fills the step exactly."""
    if effective <= 0 or max_micro <= 0 or world_size <= 0:
        raise FinetuneConfigError(f"train.effective_batch={effective}: effective batch, micro batch cap "
                                  f"({max_micro}) and world size ({world_size}) must be positive")
    accum = -(-effective // (max_micro * world_size))
    while effective % (world_size * accum) and accum * world_size <= effective:
        accum += 1
    if effective % (world_size * accum):
        raise FinetuneConfigError(f"train.effective_batch={effective}: not a multiple of {world_size} ranks x "
                                  f"an accumulation count with micro batches <= data.batch_size={max_micro}")
    return effective // (world_size * accum), accum


@dataclass
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    run: RunConfig = field(default_factory=RunConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    caption_loss: CaptionLossConfig = field(default_factory=CaptionLossConfig)
    recipe: RecipeSection = field(default_factory=RecipeSection)
    guard: SkipGuardConfig = field(default_factory=SkipGuardConfig)  # spikes off by default

    def validate(self, task: str, eval_only: bool) -> None:
        def fail(name: str, msg: str) -> None:
            raise FinetuneConfigError(f"{name}: {msg}")

        if self.model.head_init_scale <= 0:
            fail("model.head_init_scale", "must be positive")
        if task not in TASK_NAMES:
            fail("task", f"{task!r} is not one of {TASK_NAMES}")
        if self.recipe.task and self.recipe.task != task:
            fail("recipe.task", f"this recipe is for {self.recipe.task!r}, not {task!r}")
        self.model.backbone_config(task)
        d, t, run = self.data, self.train, self.run
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
        self._validate_train(fail)
        from beit3.runtime.engine import load_ds_config, resolve_ds_config, zero_stage

        try:
            run.deepspeed_config = resolve_ds_config(None, run.deepspeed_config, default=DS_DEFAULT)
            stage = zero_stage(load_ds_config(run.deepspeed_config))
        except ConfigError as e:
            fail("run.deepspeed_config", str(e))
        if t.ema_decay > 0 and stage == 3:
            fail("train.ema_decay", "EMA needs full parameters on each rank; use a ZeRO-1/2 deepspeed_config")
        if self.mixup.active and task != "classification":
            fail("mixup", "mixup/cutmix apply to classification only")
        self._validate_recipe_fields(task, fail)

    def _validate_train(self, fail) -> None:
        t = self.train
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
        if t.eval_every_epochs < 1:
            fail("train.eval_every_epochs", "must be >= 1")

    def _validate_recipe_fields(self, task: str, fail) -> None:
        self._validate_data_options(task, fail)
        t, r = self.train, self.recipe
        if t.warmup_epochs < 0:
            fail("train.warmup_epochs", "must be >= 0")
        if t.warmup_epochs > 0 and self.optim.warmup_steps > 0:
            fail("train.warmup_epochs", "set either it or optim.warmup_steps, not both")
        if t.max_steps <= 0 and t.warmup_epochs > t.epochs:
            fail("train.warmup_epochs", f"exceeds train.epochs={t.epochs}")
        if t.effective_batch < 0:
            fail("train.effective_batch", "must be >= 0 (0: data.batch_size x world size)")
        cl = self.caption_loss
        if (cl.label_smoothing > 0 or cl.drop_worst_ratio > 0) and task != "captioning":
            fail("caption_loss", "label smoothing / drop-worst of caption_loss apply to captioning only")
        if min(r.gpus, r.batch_per_gpu, r.update_freq) < 0 or r.update_freq == 0:
            fail("recipe", "gpus, batch_per_gpu must be >= 0 and update_freq >= 1")
        if r.gpus and t.effective_batch and r.gpus * r.batch_per_gpu * r.update_freq != t.effective_batch:
            fail("train.effective_batch", f"{t.effective_batch} is not recipe.gpus x batch_per_gpu x update_freq = "
                 f"{r.gpus * r.batch_per_gpu * r.update_freq}")

    def _validate_data_options(self, task: str, fail) -> None:
        from .prompts import PROMPT_SETS

        d = self.data
        if d.zeroshot_prompts not in ("templates", *PROMPT_SETS):
            fail("data.zeroshot_prompts", f"{d.zeroshot_prompts!r} is not one of {['templates', *PROMPT_SETS]}")
        bad = [tpl for tpl in d.zeroshot_templates if tpl.count("{}") != 1]
        if task == "zeroshot" and (bad or not d.zeroshot_templates):
            fail("data.zeroshot_templates", f"every template needs exactly one '{{}}' for the class name: {bad[:2]}")
        if d.caption_mask_style not in ("mask", "official"):
            fail("data.caption_mask_style", f"{d.caption_mask_style!r} is not 'mask' or 'official'")
        if d.normalize not in ("inception", "imagenet"):
            fail("data.normalize", f"{d.normalize!r} is not 'inception' or 'imagenet'")
        if d.train_transform not in ("beit3", "timm_imagenet"):
            fail("data.train_transform", f"{d.train_transform!r} is not 'beit3' or 'timm_imagenet'")
        if d.train_transform == "timm_imagenet":
            if d.normalize != "imagenet":
                fail("data.train_transform", "timm_imagenet normalizes with ImageNet mean/std: set data.normalize=imagenet")
            try:
                import timm  # noqa: F401
            except ImportError:
                fail("data.train_transform", "timm_imagenet needs timm (pip install timm)")
        if d.randaug_num_ops < 1:
            fail("data.randaug_num_ops", "must be >= 1")
        if not 0 <= d.randaug_magnitude <= 10:
            fail("data.randaug_magnitude", "must be in [0, 10]")


__all__ = ["FinetuneConfig", "FinetuneConfigError", "ModelSection", "DataSection", "TrainSection", "RunConfig",
           "RecipeSection",
           "plan_batch", "TASK_NAMES"]
