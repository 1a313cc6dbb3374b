"""Fine-tune or evaluate one task on the DeepSpeed engine: ``python -m beit3.finetune.train TASK``.

    python -m beit3.finetune.train vqa --config vqa.yaml model.pretrained=beit3_base.pth train.epochs=10
    deepspeed --num_gpus 8 -m beit3.finetune.train retrieval --config coco.yaml
    python -m beit3.finetune.train captioning --config cap.yaml --eval model.pretrained=runs/cap/model.safetensors

TASK: classification, zeroshot (``--eval`` only), vqa, nlvr2, retrieval, captioning.
Writes ``output_dir/checkpoints/step_*`` (resumable engine state), ``output_dir/model.safetensors``
(task weights, our names; ``model_ema.safetensors`` with EMA) and ``output_dir/metrics.json``.

The run-time of pretraining guards the loop: the divergence guard (``guard.*``: a non-finite loss
skips the step on every rank, a streak rolls back), the hang watchdog (``run.dist_timeout_s``),
SIGTERM/SIGINT save and stop, and ``run.save_every`` adds mid-epoch checkpoints from which
``run.resume=auto`` (the default) continues exactly. Under ``python -m beit3.runtime.supervise --
deepspeed ...`` a dead or hung rank is relaunched with ``run.resume=auto`` (docs/finetuning.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from beit3.model.config import BEiT3Config
from beit3.model.convert import load_pretrained
from beit3.model.config_io import load_config, to_dict
from beit3.runtime.engine import (build_engine, engine_dtype, fill_batch_fields, grad_accum_steps,
                                    init_distributed, load_ds_config, resolve_ds_config,
                                    shutdown_distributed)
from beit3.runtime.checkpointing import CheckpointManager, PreemptionGuard
from beit3.runtime.entry import run_main
from beit3.runtime.faults import FaultInjector
from beit3.runtime.guard import DivergenceGuard, rollback_tag
from beit3.runtime.loop import ResumableRun
from beit3.runtime.optim import param_groups
from beit3.runtime.watchdog import HangWatchdog, exit_within
from beit3.runtime.telemetry import get_logger, log_step

from .config import DS_DEFAULT, TASK_NAMES, FinetuneConfig, FinetuneConfigError, plan_batch
from .datasets import collate
from .ema import EMA
from .evaluation import move, world
from .formats import read_index
from .losses import reduce_mean
from .tasks import TASKS, Task

logger = logging.getLogger(__name__)


_ARCH_FIELDS = ("layout", "embed_dim", "depth", "num_heads", "ffn_dim", "patch_size", "in_chans", "vocab_size",
                "num_vl_layers")


def resolve_weights(path: str, cfg: BEiT3Config) -> str:
    """The weights file of ``path``: the file itself, or ``model.safetensors`` of an export folder
    (``beit3.pretrain.export``), whose ``config.json`` must describe the same architecture as ``cfg``."""
    p = Path(path)
    if not p.is_dir():
        return path
    weights = p / "model.safetensors"
    if not weights.is_file():
        raise FinetuneConfigError(f"model.pretrained={path!r}: a folder without model.safetensors")
    meta = p / "config.json"
    if meta.is_file():
        saved = json.loads(meta.read_text()).get("model", {})
        wrong = [f for f in _ARCH_FIELDS if f in saved and saved[f] != getattr(cfg, f)]
        if wrong:
            raise FinetuneConfigError(
                f"model.pretrained={path!r}: config.json has " + ", ".join(f"{f}={saved[f]!r}" for f in wrong)
                + "; the fine-tuning model has " + ", ".join(f"{f}={getattr(cfg, f)!r}" for f in wrong)
                + " (set model.preset / model.overrides to match)")
    return str(weights)


def load_weights(model: nn.Module, path: str, cfg: BEiT3Config) -> dict[str, list[str]]:
    """Our export (a ``model.safetensors`` file or the export folder), an official checkpoint
    (through ``model.convert``) or task weights into ``model``; the vision position table is
    interpolated to ``cfg.img_size``. Heads absent from
    the file stay initialized; keys the model lacks (pretraining heads, the final norm of a
    ``normalize_output=False`` backbone) are dropped. A backbone shape mismatch fails."""
    sd = load_pretrained(resolve_weights(path, cfg), cfg)
    own = model.state_dict()
    for k in [k for k in sd if k in own and sd[k].shape != own[k].shape and sd[k].numel() == own[k].numel()
              and not k.startswith("beit3.")]:
        sd[k] = sd[k].reshape(own[k].shape)  # e.g. a 0-dim logit_scale into our [1]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    bad = [k for k in mismatched if k.startswith("beit3.")]
    if bad:
        raise FinetuneConfigError(f"model.pretrained={path!r}: {bad[0]} has shape {tuple(sd[bad[0]].shape)}, the model "
                                  f"{tuple(own[bad[0]].shape)} (check model.preset / vocab_size / patch_size)")
    state = {k: v for k, v in sd.items() if k in own and k not in mismatched}
    missing = [k for k in own if k not in state]
    model.load_state_dict(state, strict=False)
    missing_backbone = [k for k in missing if k.startswith("beit3.")]
    if missing_backbone:
        logger.warning("%s: backbone keys missing from the file (left initialized): %s", path, missing_backbone[:5])
    logger.info("loaded %s: %d tensors; new (initialized): %s; dropped: %s", path, len(state),
                sorted({k.split(".")[0] for k in missing}), sorted({k.split(".")[0] for k in unexpected + mismatched}))
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def require_exact(report: dict[str, list[str]], path: str) -> None:
    """``model.strict_load``: fail unless the file gave every tensor of the task model and
    nothing else (an official task checkpoint into its task model)."""
    problems = [(name, report[name]) for name in ("missing", "unexpected", "mismatched") if report[name]]
    if problems:
        raise FinetuneConfigError(f"model.strict_load: {path!r} does not match the task model: " + "; ".join(
            f"{name} {len(keys)} (e.g. {keys[:3]})" for name, keys in problems))


def optimizer_groups(model: nn.Module, cfg: FinetuneConfig) -> list[dict]:
    """AdamW groups of a task model: layer-wise lr decay over the backbone depth
    (``lr x decay^(L + 1 - layer)``, heads at layer ``L + 1``) and ``head_lr_scale`` on the
    model's ``head_prefixes`` (the shared ``pretrain.optim.param_groups``)."""
    t = cfg.train
    return param_groups(model, cfg.optim.weight_decay, cfg.optim.lr,
                        layer_decay=t.layer_decay if t.layer_decay < 1 else None, num_layers=model.config.depth,
                        head_lr_scale=t.head_lr_scale, head_prefixes=getattr(model, "head_prefixes", ()))


def _full_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    if engine.zero_optimization_stage() == 3:
        return {k: v.float() for k, v in engine._zero3_consolidated_16bit_state_dict().items()}
    return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}


def _save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


class Trainer(ResumableRun):
    """The fine-tuning loop of one task on one DeepSpeed engine."""

    def __init__(self, task: Task, cfg: FinetuneConfig, eval_only: bool) -> None:
        self.task, self.cfg, self.eval_only = task, cfg, eval_only
        self.rank, self.world = world()
        self.out = Path(cfg.run.output_dir)
        self.log = get_logger(__name__)
        bcfg = task.backbone_cfg
        self.model = task.build_model()
        if cfg.model.pretrained:
            report = load_weights(self.model, cfg.model.pretrained, bcfg)
            if cfg.model.strict_load:
                require_exact(report, cfg.model.pretrained)
        if cfg.model.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        d = cfg.data
        self.train_rows: list[dict] = []
        if not eval_only:
            self.train_rows, _ = read_index(d.train_index, task.index_format, vocab_size=bcfg.vocab_size,
                                            num_labels=task.num_labels(), skip_bad=d.skip_bad_rows)
        self.eval_rows: list[dict] = []
        if d.eval_index:
            self.eval_rows, _ = read_index(d.eval_index, task.index_format, vocab_size=bcfg.vocab_size,
                                           num_labels=task.num_labels(), skip_bad=d.skip_bad_rows)
        t, run = cfg.train, cfg.run
        ds = self._plan_steps(load_ds_config(run.deepspeed_config))
        groups = optimizer_groups(self.model, cfg)
        self.engine, self.optimizer, self.scheduler = build_engine(self.model, ds, groups, self.optim,
                                                                   tensorboard_dir=run.tensorboard_dir(),
                                                                   job_name=f"finetune_{task.name}")
        self.device, self.dtype = self.engine.device, engine_dtype(self.engine)
        self.ema = EMA(self.engine.module, t.ema_decay) if t.ema_decay > 0 else None
        self.ckpt = CheckpointManager(str(self.out / "checkpoints"), keep_last=run.keep_last)
        self.step = 0
        self.best: Optional[dict[str, Any]] = None
        self.history: list[dict[str, Any]] = []
        self.skipped = 0  # unreadable samples
        self.guard = DivergenceGuard(cfg.guard, self.world)
        self.out.mkdir(parents=True, exist_ok=True)
        self.faults = FaultInjector(str(self.out), self.rank)
        self.watchdog: Optional[HangWatchdog] = None  # started by train()

    def _plan_steps(self, ds_json: dict[str, Any]) -> dict[str, Any]:
        """Micro batch, accumulation (``train.effective_batch``), optimizer steps per epoch, total
        and warmup steps (``train.warmup_epochs``); the DeepSpeed config with its batch fields."""
        cfg, d, t = self.cfg, self.cfg.data, self.cfg.train
        self.micro_batch, self.accum = d.batch_size, grad_accum_steps(ds_json)
        if t.effective_batch > 0:  # the recipe's samples per optimizer step, on this world size
            json_accum = self.accum
            self.micro_batch, self.accum = plan_batch(t.effective_batch, d.batch_size, self.world)
            if json_accum not in (1, self.accum):
                raise FinetuneConfigError(
                    f"train.effective_batch={t.effective_batch} needs gradient accumulation {self.accum} on "
                    f"{self.world} rank(s); {cfg.run.deepspeed_config} sets gradient_accumulation_steps={json_accum}")
            ds_json["gradient_accumulation_steps"] = self.accum
        per_step = self.micro_batch * self.world * self.accum
        self.steps_per_epoch = len(self.train_rows) // per_step  # optimizer steps
        if not self.eval_only and self.steps_per_epoch == 0:
            raise FinetuneConfigError(f"data.batch_size={d.batch_size}: {len(self.train_rows)} training rows do not "
                                      f"fill one step of {per_step} samples over {self.world} rank(s)")
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, t.epochs * self.steps_per_epoch)
        warmup = cfg.optim.warmup_steps or round(t.warmup_epochs * self.steps_per_epoch)
        if warmup > self.total_steps:
            name = "optim.warmup_steps" if cfg.optim.warmup_steps else f"train.warmup_epochs={t.warmup_epochs} ->"
            raise FinetuneConfigError(f"{name} {warmup} warmup steps exceed the {self.total_steps} training steps")
        self.optim = dataclasses.replace(cfg.optim, total_steps=self.total_steps, warmup_steps=warmup)
        return fill_batch_fields(ds_json, self.micro_batch, self.world)

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, Any]:
        module = self.engine.module
        module.eval()
        t0 = time.perf_counter()
        try:
            if self.ema is not None:
                with self.ema.applied(module):
                    res = self.task.evaluate(module, self.eval_rows, self.device, self.dtype)
            else:
                res = self.task.evaluate(module, self.eval_rows, self.device, self.dtype)
        finally:
            module.train()
        res["eval_seconds"] = round(time.perf_counter() - t0, 3)
        predictions = res.pop("predictions", None)
        if predictions is not None:  # every rank holds all of them; rank 0 writes the file (JSON)
            name = "eval" if self.eval_only else f"step{self.step}"
            path = self.out / "predictions" / f"{self.task.name}_{name}.json"
            write_metrics(path, predictions)
            res["predictions_file"] = str(path)
        return res

    # ---- training ------------------------------------------------------------------------------
    # The data position is a function of the optimizer step alone: step s (done) is epoch
    # s // steps_per_epoch, micro-batch (s % steps_per_epoch) x accum of it, and every epoch is
    # exactly steps_per_epoch x accum micro-batches. A resume, a rollback or a skip window
    # starts the epoch's sampler order there; the random streams restart from (seed, rank, step).
    def _batches(self, dataset: Any) -> Iterator[dict[str, Any]]:
        """The micro-batches from step ``self.step`` to the end of its epoch."""
        epoch, done = divmod(self.step, self.steps_per_epoch)
        sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.cfg.run.seed, drop_last=True)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        per_step = self.accum * self.micro_batch
        order = list(sampler)[done * per_step:self.steps_per_epoch * per_step]
        return iter(DataLoader(dataset, batch_size=self.micro_batch, sampler=order, collate_fn=collate,
                               num_workers=self.cfg.data.num_workers, drop_last=True))

    def client_state(self) -> dict[str, Any]:
        state = {"epoch": self.step // self.steps_per_epoch, "step": self.step, "best": self.best,
                 "history": self.history, "task": self.task.name, "guard": self.guard.state_dict()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def _restore(self, state: dict[str, Any], rollback: bool = False) -> None:
        self.step = int(state["step"])
        self.best, self.history = state.get("best"), list(state.get("history", []))
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.guard.load_state_dict(state.get("guard", {}), rollback=rollback)

    def resume(self) -> None:
        """From ``run.resume``: the newest complete checkpoint (auto), a tag, or none (fresh)."""
        if self.resume_checkpoint():
            self.log.info("resumed at step %d (epoch %d)", self.step, self.step // self.steps_per_epoch)

    def _rollback(self) -> None:
        """Every rank reloads the newest checkpoint before the bad streak (the guard's windows skip its data)."""
        tag = rollback_tag(self.guard, self.ckpt, self.step, str(self.out), self.rank)
        self._restore(self.ckpt.load(self.engine, tag), rollback=True)

    def _save_due(self) -> bool:
        run, epoch_end = self.cfg.run, self.step % self.steps_per_epoch == 0
        return (self.step == self.total_steps or (run.save_every > 0 and self.step % run.save_every == 0)
                or (epoch_end and (self.step // self.steps_per_epoch) % run.save_every_epochs == 0))

    def train(self) -> dict[str, Any]:
        dataset = self.task.dataset(self.train_rows, train=True)
        batches: Optional[Iterator[dict[str, Any]]] = None
        last_loss = float("nan")
        self.watchdog = HangWatchdog(str(self.out), self.rank, self.world, self.cfg.run.dist_timeout_s,
                                     timeout_field="run.dist_timeout_s").start()
        with PreemptionGuard() as signals:
            try:
                while self.step < self.total_steps:
                    data_step = self.guard.next_data_step(self.step + 1)
                    if data_step != self.step + 1:  # a rolled-back streak: its data steps are never trained on
                        self.log.warning("skipping data steps %d-%d (rolled back from there)", self.step + 1,
                                         data_step - 1)
                        self.step, batches = data_step - 1, None
                        continue
                    batches = batches or self._batches(dataset)
                    loss, logs = self._train_step(batches)
                    applied = self.engine.was_step_applied()
                    if self.guard.end_step(self.step, applied):
                        self._rollback()
                        batches = None
                        continue
                    if self.ema is not None and applied:
                        self.ema.update(self.engine.module)
                    if self.step % self.cfg.run.log_every == 0 or self.step == self.total_steps:
                        last_loss = self._log(loss, logs)
                    if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                        batches = None  # the next step starts the next epoch's order
                        self._end_epoch()
                    with self.watchdog.waiting():  # a collective: where a rank waits for a stalled peer
                        stop = signals.should_stop()
                    if stop or self._save_due():
                        self.ckpt.save(self.engine, self.step, self.client_state())
                        self.watchdog.beat(self.step + 1)
                    if stop:
                        self.log.warning("stopping at step %d on signal %s after saving", self.step, signals.signum)
                        break
            finally:
                self.watchdog.stop()
        return {"steps": self.step, "final_loss": last_loss, "skipped_samples": self.skipped,
                "skipped_steps": self.guard.skipped_steps, "rollbacks": len(self.guard.rollbacks)}

    def _train_step(self, batches: Iterator[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Optimizer step ``self.step + 1``: ``accum`` micro-batches, each guarded; ``self.step`` advances."""
        step = self.step + 1
        self.watchdog.beat(step)
        self.faults.at_step_start(step)
        self.task.start_step(self.step)
        torch.manual_seed(int(np.random.SeedSequence((self.cfg.run.seed, self.rank, self.step)).generate_state(1)[0]))
        for _ in range(self.accum):
            batch = next(batches)
            self.skipped += batch["skipped"]
            if batch["size"] == 0:
                raise RuntimeError("a whole batch of unreadable images; check the data (see warnings)")
            loss, logs = self.task.loss(self.engine, move(batch, self.device, self.dtype))
            loss = self.faults.corrupt_loss(loss, step)
            self.engine.backward(self.guard.check_micro(loss, step))
            with self.watchdog.waiting():  # DeepSpeed's skip decision reads the global gradient norm
                self.engine.step()
        self.step = step
        return loss, logs

    def _log(self, loss: torch.Tensor, logs: dict[str, Any]) -> float:
        """The step's line; rank 0 also appends it to ``output_dir/metrics.jsonl`` (as pretraining does)."""
        value = reduce_mean(loss.float()).item()
        line = {"epoch": round(self.step / self.steps_per_epoch, 4), "loss": value,
                "lr": self.scheduler.get_last_lr()[-1], **logs, **self.guard.metrics()}
        log_step(self.step, line)
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **line}, default=float) + "\n")
        return value

    def _end_epoch(self) -> None:
        """Evaluation at the end of every ``train.eval_every_epochs``-th epoch and of training."""
        epochs = -(-self.step // self.steps_per_epoch)
        due = epochs % self.cfg.train.eval_every_epochs == 0 or self.step == self.total_steps
        if not (self.eval_rows and due):
            return
        res = {"epoch": epochs, "step": self.step, **self.evaluate()}
        self.watchdog.beat(self.step + 1)
        self.history.append(res)
        log_step(self.step, {k: v for k, v in res.items() if isinstance(v, (int, float))})
        primary = self.task.primary
        if primary in res and (self.best is None or res[primary] > self.best[primary]):
            self.best = res

    def export(self) -> None:
        state = _full_state_dict(self.engine)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            _save_safetensors(state, self.out / "model.safetensors")
            if self.ema is not None:
                _save_safetensors(self.ema.state_dict(), self.out / "model_ema.safetensors")


def write_metrics(path: Path, payload: Any) -> None:
    """Rank 0 writes ``payload`` as JSON, atomically."""
    if world()[0] != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="beit3.finetune.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=TASK_NAMES)
    ap.add_argument("--config", help="YAML file of FinetuneConfig")
    ap.add_argument("--eval", action="store_true", help="evaluate data.eval_index only (no training)")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                    help="DeepSpeed JSON (or run.deepspeed_config; default zero1_bf16.json)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    args = ap.parse_intermixed_args(argv)  # TASK --eval key=value ... in any order
    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    cfg.run.deepspeed_config = resolve_ds_config(args.deepspeed_config, cfg.run.deepspeed_config,
                                                 default=DS_DEFAULT)
    cfg.validate(args.task, args.eval)
    init_distributed(timeout_s=cfg.run.dist_timeout_s + 60, trace_dir=str(Path(cfg.run.output_dir) / "hang"))
    log = get_logger(__name__)
    torch.manual_seed(cfg.run.seed)
    tokenizer = None
    if cfg.data.spm:
        from beit3.data_pipeline.tokenizer import TextTokenizer

        tokenizer = TextTokenizer(cfg.data.spm)
    task = TASKS[args.task](cfg, tokenizer)
    trainer = Trainer(task, cfg, args.eval)
    out = Path(cfg.run.output_dir)
    payload: dict[str, Any] = {"task": args.task, "eval_only": args.eval, "world_size": trainer.world,
                               "config": to_dict(cfg)}
    if args.eval:
        payload["final"] = trainer.evaluate()
        log.info("%s eval: %s", args.task, payload["final"])
        write_metrics(out / "metrics.json", payload)
        return payload
    trainer.resume()
    if trainer.step:
        payload["resumed_from_step"] = trainer.step
    if cfg.train.eval_before_training and trainer.eval_rows and trainer.step == 0:
        payload["initial"] = trainer.evaluate()
        log.info("%s before training: %s", args.task, payload["initial"])
    payload["train"] = trainer.train()
    trainer.export()
    payload.update(history=trainer.history, best=trainer.best,
                   final=trainer.history[-1] if trainer.history else None)
    write_metrics(out / "metrics.json", payload)
    return payload


def _process(argv: list[str]) -> None:
    main(argv)
    shutdown_distributed()  # the agreed end of launched ranks (see shutdown_distributed)


if __name__ == "__main__":  # exit codes of beit3.runtime.entry; a shutdown that hangs still ends
    exit_within(run_main(_process, sys.argv[1:]))


__all__ = ["main", "Trainer", "load_weights", "require_exact", "resolve_weights", "optimizer_groups",
           "write_metrics"]
