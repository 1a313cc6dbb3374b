"""Masked data modeling: the one pretraining loss of BEiT-3.

``mdm_loss`` (the default step) runs the micro-batch's three sources (images: MIM; texts: MLM;
pairs: MIM + MLM on the fused sequence) through ONE packed, padding-free forward
(``model.packed``): one forward and one backward per micro-step, every module called on every
rank in the same order, also when a source is missing or empty, so ZeRO-3 gathers each
parameter once per pass. ``three_pass_mdm_loss`` is the per-source implementation (three
forwards, the official code's order), kept as the test and bench baseline. The loss is
``MIM + MLM``: cross-entropy averaged over all masked patches (images and pairs) plus
cross-entropy averaged over all masked text tokens (texts and pairs); each part is also logged
on its own with its accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from beit3.data_pipeline.augment import finish_views
from beit3.model.packed import PackedLayout, SourceBatch, plan_layout
from beit3.runtime.host_syncs import host_side
from beit3.runtime.telemetry import read_scalars

SOURCES = ("image", "text", "pair")
TargetFn = Callable[[Tensor, Tensor], Tensor]  # (tokenizer_images, image_mask) -> codes at masked positions


@dataclass
class PartStats:
    """Summed loss, correct predictions and count of one part (e.g. pair/mim)."""

    loss_sum: Tensor
    correct: Tensor
    count: int


@dataclass
class MDMResult:
    loss: Tensor
    parts: dict[str, PartStats] = field(default_factory=dict)
    flops: float = 0.0  # training FLOPs of the micro-batch's real tokens (``real_token_flops``)

    def metric_tensors(self) -> dict[str, Tensor]:
        """Per-part mean loss and accuracy, plus the combined mim/mlm values (this rank): 0-d float64
        tensors where the loss is, so a step reads nothing from the device until it logs."""
        out: dict[str, Tensor] = {"loss": self.loss.detach().double()}
        for kind in ("mim", "mlm"):
            parts = {k: v for k, v in self.parts.items() if k.endswith(kind)}
            n = sum(p.count for p in parts.values())
            if n:
                out[f"{kind}_loss"] = sum(p.loss_sum.detach() for p in parts.values()).double() / n
                out[f"{kind}_acc"] = sum(p.correct for p in parts.values()).double() / n
        for name, p in self.parts.items():
            if p.count:
                out[f"{name}_loss"] = p.loss_sum.detach().double() / p.count
                out[f"{name}_acc"] = p.correct.double() / p.count
        return out

    def metrics(self) -> dict[str, float]:
        """``metric_tensors`` as floats (one read)."""
        return read_scalars(self.metric_tensors())


def _part(logits: Tensor, labels: Tensor, grad: bool = True) -> PartStats:
    logits = logits.float() if grad else logits.detach().float()
    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
    correct = (logits.argmax(-1) == labels).sum().detach()
    return PartStats(loss_sum, correct, int(labels.numel()))


def to_device(batch: Mapping[str, Any], device: torch.device, float_dtype: torch.dtype) -> dict[str, Any]:
    """Tensors of one source to ``device``; float tensors to the model's dtype (tokenizer view excepted)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            dtype = float_dtype if v.is_floating_point() and k == "images" else None
            v = v.to(device, dtype=dtype, non_blocking=True)
        out[k] = v
    return out


def device_source(batch: Mapping[str, Any], device: torch.device, float_dtype: torch.dtype) -> dict[str, Any]:
    """One source on ``device`` with its views rendered there (``data.augment_on: device`` ships
    uint8 crops + augmentation parameters; ``finish_views`` leaves finished views as they are)."""
    return finish_views(to_device(batch, device, float_dtype), float_dtype)


def image_labels(src: Mapping[str, Any], targets: Optional[TargetFn], index: Optional[Tensor] = None) -> Tensor:
    """Visual-token labels at the masked patches: offline codes, or the frozen tokenizer online.
    ``index``: the flat positions of the masked patches in ``[B * P]`` (``plan_micro``), so the
    selection waits for nothing; without it the mask selects (a boolean index)."""
    mask = src["image_mask"]
    if "codes" in src:
        codes = src["codes"].long()
        return codes[mask] if index is None else codes.flatten().index_select(0, index)
    if targets is None:
        raise RuntimeError("batch has no offline codes and no image tokenizer is configured (targets.tokenizer_path)")
    if index is None or not hasattr(targets, "codes"):
        return targets(src["tokenizer_images"], mask)
    codes = targets.codes(src["tokenizer_images"])  # [B, P]
    if codes.shape != mask.shape:
        raise ValueError(f"image_mask {tuple(mask.shape)} does not match the tokenizer's patch grid {tuple(codes.shape)}")
    return codes.flatten().index_select(0, index.to(codes.device))


@dataclass
class MicroPlan:
    """What the host knows of a micro-batch before its tensors move (``plan_micro``): the packed
    layout, the flat positions of every part's labels and the real-token FLOPs."""

    layout: PackedLayout
    label_index: dict[str, Tensor]  # "image/mim" -> positions in [B * P]; "pair/mlm" -> positions in [B * L]
    flops: float

    def to(self, device: torch.device) -> "MicroPlan":
        return MicroPlan(self.layout.to(device), {k: v.to(device, non_blocking=True)
                                                  for k, v in self.label_index.items()}, self.flops)


def _host_source(src: Mapping[str, Any]) -> SourceBatch:
    """A loader source as ``plan_layout`` reads it: masks and ids; the images only counted (uint8
    ``crops`` stand for the views ``augment_on: device`` renders later)."""
    images = src.get("images", src.get("crops"))
    return source_batch({**src, "images": images} if images is not None else src)


def plan_micro(module: Any, batch: Mapping[str, Any], present: list[str]) -> MicroPlan:
    """Layout, label positions and FLOPs from the loader's (CPU) masks, before the host-to-device
    copy: the value-dependent work of the step (``nonzero``, lengths, counts) never waits for the device."""
    with host_side():
        layout = plan_layout(module.config, **{s: _host_source(batch[s]) for s in present})
        index = {}
        for s in present:
            src = batch[s]
            if "image_mask" in src and ("images" in src or "crops" in src):
                index[f"{s}/mim"] = src["image_mask"].bool().flatten().nonzero().squeeze(1)
            if "text_ids" in src:
                index[f"{s}/mlm"] = src["text_mask"].bool().flatten().nonzero().squeeze(1)
        return MicroPlan(layout, index, real_token_flops(module, batch))


def source_batch(src: Mapping[str, Any]) -> SourceBatch:
    """One loader source (``images``, ``image_mask``, ``text_ids``, ``padding_mask``, ``text_mask``)
    as the packed forward's input."""
    has_image, has_text = "images" in src, "text_ids" in src
    return SourceBatch(images=src.get("images"), image_mask=src.get("image_mask") if has_image else None,
                       text_ids=src.get("text_ids"), padding_mask=src.get("padding_mask") if has_text else None,
                       text_mask=src.get("text_mask") if has_text else None)


def mdm_loss(model: Callable[..., Any], batch: Mapping[str, Any], targets: Optional[TargetFn],
             device: torch.device, float_dtype: torch.dtype = torch.float32) -> MDMResult:
    """The micro-batch's sources in one packed forward; the combined MDM loss with per-part stats.

    ``model`` is a ``BEiT3ForPretraining`` or an engine wrapping one (called with ``sources=``).
    Both heads always enter the loss (an empty selection adds an exact zero), so every parameter
    gets a gradient on every rank.
    """
    present = [s for s in SOURCES if s in batch]
    if not present:
        raise ValueError("micro-batch has no source (expected 'image', 'text' and/or 'pair')")
    plan = plan_micro(getattr(model, "module", model), batch, present).to(device)
    srcs = {s: device_source(batch[s], device, float_dtype) for s in present}
    out = model(sources={s: source_batch(v) for s, v in srcs.items()}, layout=plan.layout)
    labels: dict[str, Tensor] = {}
    for s in present:
        if "images" in srcs[s]:
            labels[f"{s}/mim"] = image_labels(srcs[s], targets, plan.label_index.get(f"{s}/mim"))
        if "text_ids" in srcs[s]:
            labels[f"{s}/mlm"] = srcs[s]["text_labels"].flatten().index_select(0, plan.label_index[f"{s}/mlm"])
    loss = None
    parts: dict[str, PartStats] = {}
    for kind, logits, order in (("mim", out.mim_logits, ("image", "pair")), ("mlm", out.mlm_logits, ("pair", "text"))):
        names = [f"{s}/{kind}" for s in order if f"{s}/{kind}" in labels]
        target = torch.cat([labels[n] for n in names]) if names else logits.new_zeros(0, dtype=torch.long)
        whole = _part(logits, target)  # [M, V] of both sources: one head call, one loss term
        term = whole.loss_sum / max(whole.count, 1)
        loss = term if loss is None else loss + term
        for n in names:
            source = n.split("/")[0]
            parts[n] = _part(out.mim(source) if kind == "mim" else out.mlm(source), labels[n], grad=False)
    parts = {n: parts[n] for n in (f"{s}/{k}" for s in SOURCES for k in ("mim", "mlm")) if n in parts}
    return MDMResult(loss=loss, parts=parts, flops=plan.flops)


def real_token_flops(model: Any, batch: Mapping[str, Any]) -> float:
    """Training FLOPs (3x forward, no recompute) of the micro-batch's real tokens: padding is not
    counted, so MFU measures useful work. ``model``: ``BEiT3ForPretraining`` or an engine around it."""
    module = getattr(model, "module", model)
    S = module.config.num_vision_tokens
    total = 0.0
    for source in SOURCES:
        src = batch.get(source)
        if not src:
            continue
        images = src.get("images", src.get("crops"))  # uint8 crops: views rendered on the device later
        n = len(images if images is not None else src["text_ids"])
        lengths = [0] * n
        if "text_ids" in src:
            pad = src.get("padding_mask")
            real = (~pad.bool()).sum(1) if pad is not None else torch.full((n,), src["text_ids"].shape[1])
            lengths = real.tolist()
        mp = src["image_mask"].sum(1).tolist() if images is not None and "image_mask" in src else [0] * n
        mt = src["text_mask"].sum(1).tolist() if "text_ids" in src and "text_mask" in src else [0] * n
        img = S if images is not None else 0
        total += sum(module.flops_per_sample(img, l, num_masked_patches=p, num_masked_text=t)
                     for l, p, t in zip(lengths, mp, mt))
    return total


def three_pass_mdm_loss(model: Callable[..., Any], batch: Mapping[str, Any], targets: Optional[TargetFn],
                        device: torch.device, float_dtype: torch.dtype = torch.float32) -> MDMResult:
    """One forward per source (images, texts, pairs): the baseline of the packed ``mdm_loss``."""
    parts: dict[str, PartStats] = {}
    srcs = {s: device_source(batch[s], device, float_dtype) for s in SOURCES if s in batch}
    for source, src in srcs.items():
        has_image = "images" in src
        has_text = "text_ids" in src
        out = model(images=src.get("images"), image_mask=src.get("image_mask") if has_image else None,
                    text_ids=src.get("text_ids"), text_padding_mask=src.get("padding_mask"),
                    text_mask=src.get("text_mask") if has_text else None)
        if has_image:
            parts[f"{source}/mim"] = _part(out.mim_logits, image_labels(src, targets))
        if has_text:
            parts[f"{source}/mlm"] = _part(out.mlm_logits, src["text_labels"][src["text_mask"]])
    return _combine(parts, real_token_flops(model, srcs))


def _combine(parts: dict[str, PartStats], flops: float) -> MDMResult:
    """Mean MIM over all masked patches + mean MLM over all masked tokens."""
    loss = None
    for kind in ("mim", "mlm"):
        group = [p for k, p in parts.items() if k.endswith(kind)]
        n = sum(p.count for p in group)
        if group:  # an empty selection still contributes a zero that keeps the graph connected
            term = sum(p.loss_sum for p in group) / max(n, 1)
            loss = term if loss is None else loss + term
    if loss is None:
        raise ValueError("micro-batch has no source (expected 'image', 'text' and/or 'pair')")
    return MDMResult(loss=loss, parts=parts, flops=flops)


__all__ = ["mdm_loss", "three_pass_mdm_loss", "real_token_flops", "source_batch", "MDMResult", "PartStats",
           "MicroPlan", "plan_micro",
           "image_labels", "to_device", "device_source", "SOURCES"]
