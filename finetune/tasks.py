"""The fine-tuning tasks: model construction, training loss, evaluation, per task.

Each ``Task`` knows its index format, its model (``heads``), the loss of one batch given the
engine (or module), and its evaluation over an index (distributed, see ``evaluation``).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beit3.data_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID

from . import metrics as M
from .config import FinetuneConfig, FinetuneConfigError
from .datasets import ImageViewConfig, TaskDataset, pad_texts, text_ids
from .evaluation import all_ranks, move, sharded_outputs, stack
from .formats import read_answer_vocab
from .generation import SpecialIds, beam_search
from .heads import (CaptioningModel, ImageClassifier, NLVR2Model, RetrievalModel, VQAModel,
                    zero_shot_class_embeddings, zero_shot_logits)
from .losses import Mixup, caption_token_loss, contrastive_loss, soft_target_cross_entropy, vqa_loss
from .prompts import prompt_templates

logger = logging.getLogger(__name__)

Forward = Callable[..., Any]  # the DeepSpeed engine or the bare module


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FinetuneConfigError(f"file {path!r} does not exist")
    return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


class Task:
    """Base: subclasses set ``name``, ``index_format``, ``primary`` (the metric to select on)."""

    name = ""
    index_format = ""
    primary = ""

    def __init__(self, cfg: FinetuneConfig, tokenizer: Optional[Any] = None) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.step = 0  # optimizer steps done (the trainer sets it; drop-worst starts from it)
        self.backbone_cfg = cfg.model.backbone_config(self.name)

    # ---- construction ------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def num_labels(self) -> Optional[int]:
        return None

    def dataset(self, rows: list[dict], train: bool) -> TaskDataset:
        d = self.cfg.data
        view = ImageViewConfig(self.backbone_cfg.img_size, train, tuple(d.crop_scale),
                               flip=self.name == "classification" if d.train_flip is None else d.train_flip,
                               randaug_ops=d.randaug_num_ops if d.randaug else 0,
                               randaug_magnitude=d.randaug_magnitude, normalize=d.normalize,
                               eval_center_crop=d.eval_center_crop, train_transform=d.train_transform)
        return TaskDataset(rows, self.index_format, d.data_root, view, d.max_text_len,
                           num_answers=self.num_labels() or 0,
                           mask_id=getattr(self.tokenizer, "mask_id", None), mask_prob=d.caption_mask_prob,
                           random_vocab=self.tokenizer.vocab_size
                           if self.name == "captioning" and d.caption_mask_style == "official" else 0,
                           seed=self.cfg.run.seed)

    # ---- training ------------------------------------------------------------------------------
    def start_step(self, step: int) -> None:
        """Before the micro-batches of optimizer step ``step + 1`` (``step`` done): the task's own
        random streams restart from (seed, step), so a resumed run draws what the uninterrupted one did."""
        self.step = step

    def loss(self, forward: Forward, batch: dict[str, Any]) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, rows: list[dict], device: torch.device,
                 dtype: torch.dtype) -> dict[str, Any]:
        raise NotImplementedError

    def _eval_outputs(self, model: nn.Module, rows: list[dict], device: torch.device, dtype: torch.dtype,
                      fn: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[dict[int, dict], int]:
        d = self.cfg.data
        ds = self.dataset(rows, train=False)
        return sharded_outputs(ds, d.eval_batch_size, d.num_workers, lambda b: fn(move(b, device, dtype)))


class ClassificationTask(Task):
    name = index_format = "classification"
    primary = "top1"

    def num_labels(self) -> int:
        d = self.cfg.data
        return d.num_classes if d.num_classes > 0 else len(_read_lines(d.classes))

    def build_model(self) -> nn.Module:
        return ImageClassifier(self.backbone_cfg, self.num_labels(), init_scale=self.cfg.model.head_init_scale)

    def start_step(self, step: int) -> None:
        super().start_step(step)
        self._mixup = Mixup(self.cfg.mixup, self.num_labels(), seed=(self.cfg.run.seed, step))

    def loss(self, forward, batch):
        if not hasattr(self, "_mixup"):
            self.start_step(self.step)
        images, targets = self._mixup(batch["images"], batch["labels"])
        logits = forward(images)
        return soft_target_cross_entropy(logits, targets), {}

    def evaluate(self, model, rows, device, dtype):
        out, skipped = self._eval_outputs(model, rows, device, dtype,
                                          lambda b: {"logits": model(b["images"]), "label": b["labels"]})
        res = M.topk_accuracy(stack(out, "logits"), torch.tensor([out[i]["label"] for i in sorted(out)]))
        return {**res, "num_examples": len(out), "skipped": skipped}


class ZeroShotTask(ClassificationTask):
    """Classification by image-to-text retrieval with a dual encoder: class prompts as texts
    (``data.zeroshot_prompts``: a set of ``prompts``, e.g. CLIP's 80-template ensemble, or
    ``data.zeroshot_templates``), each class's prompt embeddings averaged (``heads``)."""

    name = "zeroshot"
    index_format = "classification"

    def build_model(self) -> nn.Module:
        return RetrievalModel(self.backbone_cfg)

    def class_texts(self) -> tuple[list[Tensor], list[Tensor]]:
        d = self.cfg.data
        names = _read_lines(d.classes)
        templates = prompt_templates(d.zeroshot_prompts, d.zeroshot_templates)
        ids, pads = [], []
        for name in names:
            seqs = [text_ids(self.tokenizer.encode(t.format(name)), d.max_text_len) for t in templates]
            i, p = pad_texts(seqs)
            ids.append(i)
            pads.append(p)
        return ids, pads

    def loss(self, forward, batch):  # pragma: no cover - validate() refuses training
        raise FinetuneConfigError("zeroshot only evaluates")

    def evaluate(self, model, rows, device, dtype):
        ids, pads = self.class_texts()
        emb = zero_shot_class_embeddings(model, [i.to(device) for i in ids], [p.to(device) for p in pads])
        out, skipped = self._eval_outputs(model, rows, device, dtype, lambda b: {
            "logits": zero_shot_logits(model, b["images"], emb), "label": b["labels"]})
        res = M.topk_accuracy(stack(out, "logits"), torch.tensor([out[i]["label"] for i in sorted(out)]))
        return {**res, "num_examples": len(out), "skipped": skipped}


class VQATask(Task):
    name = index_format = "vqa"
    primary = "vqa_score"

    def answers(self) -> list[str]:
        if not hasattr(self, "_answers"):
            self._answers = read_answer_vocab(self.cfg.data.answer_vocab)
        return self._answers

    def num_labels(self) -> int:
        return len(self.answers())

    def build_model(self) -> nn.Module:
        return VQAModel(self.backbone_cfg, self.num_labels())

    def loss(self, forward, batch):
        logits = forward(batch["images"], batch["text_ids"], batch["text_padding_mask"])
        return vqa_loss(logits, batch["targets"]), {}

    def evaluate(self, model, rows, device, dtype):
        out, skipped = self._eval_outputs(model, rows, device, dtype, lambda b: {
            "logits": model(b["images"], b["text_ids"], b["text_padding_mask"]), "targets": b["targets"]})
        order = sorted(out)
        logits, targets = stack(out, "logits", order), stack(out, "targets", order)
        res: dict[str, Any] = {"vqa_score": M.vqa_score(logits, targets), "num_examples": len(out),
                               "skipped": skipped}
        vocab, pred = self.answers(), logits.argmax(dim=-1).tolist()
        if all("answers" in rows[i] for i in order):  # the official metric from raw annotator answers
            res["vqa_accuracy"] = sum(M.vqa_accuracy_from_answers(vocab[p], rows[i]["answers"])
                                      for p, i in zip(pred, order)) / max(len(order), 1)
        # the VQAv2 evaluation server's result format (test-dev / test-std submissions)
        res["predictions"] = [{"question_id": rows[i]["qid"], "answer": vocab[p]} for p, i in zip(pred, order)]
        return res


class NLVR2Task(Task):
    name = index_format = "nlvr2"
    primary = "accuracy"

    def build_model(self) -> nn.Module:
        return NLVR2Model(self.backbone_cfg)

    def loss(self, forward, batch):
        logits = forward(batch["images"], batch["images2"], batch["text_ids"], batch["text_padding_mask"])
        return F.cross_entropy(logits.float(), batch["labels"]), {}

    def evaluate(self, model, rows, device, dtype):
        out, skipped = self._eval_outputs(model, rows, device, dtype, lambda b: {
            "pred": model(b["images"], b["images2"], b["text_ids"], b["text_padding_mask"]).argmax(-1),
            "label": b["labels"]})
        acc = sum(int(o["pred"] == o["label"]) for o in out.values()) / max(len(out), 1)
        return {"accuracy": acc, "num_examples": len(out), "skipped": skipped}


class RetrievalTask(Task):
    name = index_format = "retrieval"
    primary = "rsum"

    def build_model(self) -> nn.Module:
        return RetrievalModel(self.backbone_cfg)

    def loss(self, forward, batch):
        img, txt, logit_scale = forward(images=batch["images"], text_ids=batch["text_ids"],
                                        text_padding_mask=batch["text_padding_mask"])
        loss, _ = contrastive_loss(img, txt, logit_scale)
        return loss, {"logit_scale": float(logit_scale.detach().exp())}

    def evaluate(self, model, rows, device, dtype):
        image_of: dict[Any, int] = {}
        image_rows = []
        for r in rows:
            if r["image_id"] not in image_of:
                image_of[r["image_id"]] = len(image_rows)
                image_rows.append({"image_path": r["image_path"], "text_segment": [BOS_ID], "image_id": r["image_id"]})
        d = self.cfg.data
        view = ImageViewConfig(self.backbone_cfg.img_size, False, normalize=d.normalize)
        images = TaskDataset(image_rows, "image", d.data_root, view)
        img_out, skipped = sharded_outputs(images, d.eval_batch_size, d.num_workers,
                                           lambda b: {"f": model.image_features(move(b, device, dtype)["images"])})
        texts = _TextRows(rows, d.max_text_len)
        txt_out, _ = sharded_outputs(texts, d.eval_batch_size, 0, lambda b: {
            "f": model.text_features(b["text_ids"].to(device), b["text_padding_mask"].to(device))})
        keep_img = sorted(img_out)  # unreadable images drop out with their texts
        new_id = {old: new for new, old in enumerate(keep_img)}
        txt_keep = [j for j in sorted(txt_out) if image_of[rows[j]["image_id"]] in new_id]
        scores = stack(img_out, "f", keep_img) @ stack(txt_out, "f", txt_keep).t()  # [N_img, N_txt]
        res = M.retrieval_recall(scores, [new_id[image_of[rows[j]["image_id"]]] for j in txt_keep])
        return {**res, "num_images": len(keep_img), "num_texts": len(txt_keep), "skipped": skipped}


class _TextRows(torch.utils.data.Dataset):
    """Text side of a retrieval index (no image reads): items for ``collate``."""

    def __init__(self, rows: list[dict], max_len: int) -> None:
        self.rows, self.max_len = rows, max_len

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"index": i, "images": torch.zeros(0), "text": text_ids(self.rows[i]["text_segment"], self.max_len)}


class CaptioningTask(Task):
    name = index_format = "captioning"
    primary = "cider"

    def build_model(self) -> nn.Module:
        if self.tokenizer is not None and self.tokenizer.vocab_size > self.backbone_cfg.vocab_size:
            raise FinetuneConfigError(f"model vocab_size={self.backbone_cfg.vocab_size} is smaller than the "
                                      f"tokenizer's {self.tokenizer.vocab_size}")
        return CaptioningModel(self.backbone_cfg)

    def dataset(self, rows, train):
        if train:
            bad = [i for i, r in enumerate(rows) if not r.get("text_segment")]
            if bad:
                raise FinetuneConfigError(f"data.train_index: {len(bad)} captioning row(s) without text_segment "
                                          f"(first: row {bad[0] + 1}); training needs captions")
        return super().dataset(rows, train)

    def loss(self, forward, batch):
        logits = forward(batch["images"], batch["text_ids"], batch["text_padding_mask"], batch["masked"])
        return caption_token_loss(logits, batch["targets"], self.cfg.caption_loss, self.step), {}

    def special_ids(self) -> SpecialIds:
        return SpecialIds(bos=BOS_ID, eos=EOS_ID, pad=PAD_ID, mask=self.tokenizer.mask_id,
                          vocab_size=self.tokenizer.vocab_size)

    def references(self, rows: list[dict]) -> dict[Any, list[str]]:
        refs: dict[Any, list[str]] = defaultdict(list)
        for r in rows:
            if r.get("references"):
                refs[r["image_id"]].extend(r["references"])
            elif r.get("text"):
                refs[r["image_id"]].append(r["text"])
            elif r.get("text_segment"):
                refs[r["image_id"]].append(self.tokenizer.decode(r["text_segment"]))
        return refs

    def evaluate(self, model, rows, device, dtype):
        refs = self.references(rows)
        first: dict[Any, int] = {}
        for i, r in enumerate(rows):
            first.setdefault(r["image_id"], i)
        image_rows = [rows[i] for i in first.values() if refs.get(rows[i]["image_id"])]
        ids = self.special_ids()
        gen = self.cfg.generation

        def decode(b: dict[str, Any]) -> dict[str, Any]:
            results = beam_search(model, b["images"], ids, gen, sync=all_ranks)
            return {"caption": [self.tokenizer.decode(seq) for seq, _ in results]}

        out, skipped = self._eval_outputs(model, image_rows, device, dtype, decode)
        hyps = {image_rows[i]["image_id"]: o["caption"] for i, o in out.items()}
        gts = {k: refs[k] for k in hyps}
        return {"bleu4": M.bleu4(hyps, gts), "cider": M.cider_d(hyps, gts), "num_images": len(hyps),
                "skipped": skipped, "examples": dict(list(hyps.items())[:5]),
                # the COCO caption evaluation result format (also what nocaps / the test server take)
                "predictions": [{"image_id": k, "caption": v} for k, v in hyps.items()]}


TASKS: dict[str, type[Task]] = {t.name: t for t in (ClassificationTask, ZeroShotTask, VQATask, NLVR2Task,
                                                     RetrievalTask, CaptioningTask)}

__all__ = ["Task", "TASKS", "ClassificationTask", "ZeroShotTask", "VQATask", "NLVR2Task", "RetrievalTask",
           "CaptioningTask"]
