"""Memory side of the run planner (``pretrain/plan.py``): model states per ZeRO stage from the
sharding arithmetic, ZeRO-3 buffers from the DeepSpeed JSON, and activation bytes MEASURED by
running the real forward + backward (``mdm_loss`` on ``BEiT3ForPretraining``) without allocating.

How activations are measured: parameters and float activations live on the ``meta`` device (no
storage); the small integer/bool tensors of the batch (masks, ids, codes) stay real on the CPU,
because the packed forward reads them (``nonzero``, ``int(...)``) to lay out the token stream.
``MetaBridge`` (a ``TorchDispatchMode``) moves CPU operands to ``meta`` whenever an op mixes the
two, and keeps ``.to(cpu)`` of a meta tensor on meta. ``SavedBytes`` (``saved_tensors_hooks``)
sums the bytes of the unique storages autograd saves for backward (parameters excluded): the
activation memory held at the end of forward. With activation checkpointing the checkpoint
keeps each block's input (not seen by the hooks, the checkpoint installs its own), so the
planner passes a ``checkpoint_fn`` that records that input and then calls
``torch.utils.checkpoint`` (non-reentrant, the model's default). The same tracker runs over real
CPU tensors in ``tests/test_plan.py`` to check the meta prediction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from beit3.model import BEiT3ForPretraining
from beit3.model.config import BEiT3Config

GB = 1e9
# name: (memory bytes, dense bf16 TFLOP/s); peaks as runtime/telemetry.PEAK_BF16_TFLOPS rounds them
GPUS: dict[str, tuple[float, float]] = {
    "h100": (80e9, 989.0), "h200": (141e9, 989.0), "a100-40gb": (40e9, 312.0), "a100-80gb": (80e9, 312.0)}
HEADROOM = 0.10


# ---- DeepSpeed JSON -----------------------------------------------------------------------------
@dataclass
class ZeroSetup:
    stage: int
    bf16: bool
    grad_bytes: int  # bytes per gradient element (data_types.grad_accum_dtype; fp32 when absent)
    offload_optimizer: bool
    prefetch_bucket: int  # elements
    max_live: int  # elements
    reduce_bucket: int  # elements
    accum: int
    persistence: int = 100_000  # stage3_param_persistence_threshold: params this small stay gathered


def zero_setup(ds: dict[str, Any]) -> ZeroSetup:
    zo = ds.get("zero_optimization", {}) or {}
    bf16 = bool((ds.get("bf16") or {}).get("enabled", False) or (ds.get("fp16") or {}).get("enabled", False))
    gdt = str((ds.get("data_types") or {}).get("grad_accum_dtype", "fp32")).lower()
    off = (zo.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    accum = ds.get("gradient_accumulation_steps", 1)
    return ZeroSetup(stage=int(zo.get("stage", 0)), bf16=bf16, grad_bytes=2 if gdt in ("bf16", "fp16") else 4,
                     offload_optimizer=off, prefetch_bucket=int(zo.get("stage3_prefetch_bucket_size", 5e7)),
                     max_live=int(zo.get("stage3_max_live_parameters", 1e9)),
                     reduce_bucket=int(zo.get("reduce_bucket_size", 5e8)),
                     accum=int(accum) if isinstance(accum, int) else 1,
                     persistence=int(zo.get("stage3_param_persistence_threshold", 1e5)))


def partition_numel(numels: Sequence[int], ranks: int) -> int:
    """Elements of one rank's ZeRO-3 partition: each parameter is padded to ``ceil(n / ranks)``
    (DeepSpeed's ``ds_tensor``), so the sum is exact, not ``N / ranks``."""
    return sum(-(-n // ranks) for n in numels)


def model_state_bytes(numel: Union[int, Sequence[int]], ranks: int, stage: int, bf16: bool = True,
                      grad_bytes: int = 4, offload_optimizer: bool = False) -> dict[str, float]:
    """Per-rank GPU bytes of parameters, gradients and optimizer states (mixed precision: bf16
    params + fp32 master + 2 fp32 Adam moments; fp32: fp32 params, 2 moments, no master copy).
    Stage 1 shards the optimizer states, 2 also gradients, 3 also parameters; offload moves the
    optimizer states and the gradient partitions to the CPU (ZeRO-Offload). ``numel``: the total
    (sharded as ``N / ranks``) or every parameter's size (stage 3: the padded partitions)."""
    param_b = 2 if bf16 else 4
    optim_b = (4 if bf16 else 0) + 8
    if not bf16:
        grad_bytes = 4
    if isinstance(numel, int):
        total, part = numel, numel / ranks
    else:
        total, part = sum(numel), (partition_numel(numel, ranks) if stage >= 3 else -(-sum(numel) // ranks))
    shard = lambda b, s: (part if stage >= s else total) * b  # noqa: E731
    out = {"params": shard(param_b, 3), "grads": shard(grad_bytes, 2), "optimizer": shard(optim_b, 1)}
    if offload_optimizer:
        out["optimizer"] = out["grads"] = 0.0
    return out


def zero3_buffers(z: ZeroSetup, numel: int, largest_layer: int, persistent: int = 0) -> dict[str, float]:
    """ZeRO-3's GPU buffers in bytes: the prefetch bucket and the gathered layer (16-bit), the
    gradient reduce bucket (grad dtype), the parameters at or under the persistence threshold
    (``persistent`` elements, kept gathered on every rank); live parameters are bounded by
    stage3_max_live_parameters (a cap, not added)."""
    if z.stage < 3:
        return {"reduce_bucket": min(z.reduce_bucket, numel) * z.grad_bytes}
    pb = 2 if z.bf16 else 4
    return {"prefetch_bucket": min(z.prefetch_bucket, numel) * pb, "gathered_layer": largest_layer * pb,
            "reduce_bucket": min(z.reduce_bucket, numel) * z.grad_bytes, "persistent_params": persistent * pb,
            "max_live_cap": min(z.max_live, numel) * pb}


def persistent_numel(model: torch.nn.Module, threshold: int) -> int:
    """Elements of the parameters ZeRO-3 keeps gathered (``ds_numel <= threshold``, DeepSpeed's rule)."""
    return sum(p.numel() for p in model.parameters() if p.numel() <= threshold)


def largest_layer_numel(model: torch.nn.Module) -> int:
    """Parameters of the largest leaf module (DeepSpeed's ``largest_layer_params``)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


# ---- the micro-batch ----------------------------------------------------------------------------
def _text_source(rows: int, length: int, ratio: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Full-length texts (the config's max length: an upper bound), ``round(ratio * body)`` masked."""
    ids = torch.randint(5, 100, (rows, length), generator=gen)
    k = max(1, int(round(ratio * (length - 2))))
    mask = torch.zeros(rows, length, dtype=torch.bool)
    mask[:, 1:1 + k] = True
    return {"text_ids": ids, "padding_mask": torch.zeros(rows, length, dtype=torch.bool), "text_mask": mask,
            "text_labels": ids.clone()}


def _image_source(rows: int, cfg: BEiT3Config, masked: int, device: str, dtype: torch.dtype,
                  gen: torch.Generator) -> dict[str, torch.Tensor]:
    mask = torch.zeros(rows, cfg.num_patches, dtype=torch.bool)
    mask[:, :masked] = True
    images = torch.empty(rows, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, dtype=dtype)
    if device != "meta":
        images.normal_(generator=gen)
    codes = torch.randint(0, cfg.num_visual_tokens, (rows, cfg.num_patches), generator=gen)
    return {"images": images, "image_mask": mask, "codes": codes}


def build_batch(cfg: BEiT3Config, data: Any, micro: dict[str, int], device: str = "meta",
                dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """One rank's micro-batch as the loader gives it after ``finish_views`` (offline codes as the
    MIM labels): the real shapes, masked counts from ``data.image_mask`` / ``data.text_mask``."""
    gen = torch.Generator().manual_seed(seed)
    masked = data.image_mask.target(cfg.num_patches)
    batch: dict[str, dict[str, torch.Tensor]] = {}
    if micro.get("image"):
        batch["image"] = _image_source(micro["image"], cfg, masked, device, dtype, gen)
    if micro.get("text"):
        batch["text"] = _text_source(micro["text"], data.max_text_len, data.text_mask.text_ratio, gen)
    if micro.get("pair"):
        batch["pair"] = {**_image_source(micro["pair"], cfg, masked, device, dtype, gen),
                         **_text_source(micro["pair"], data.max_pair_text_len, data.text_mask.pair_ratio, gen)}
    return batch


# ---- tracking -----------------------------------------------------------------------------------
class MetaBridge(TorchDispatchMode):
    """Ops mixing meta and CPU operands run on meta; ``.to(cpu)`` of a meta tensor stays meta."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # one meta twin per CPU tensor view

    def _meta(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return t
        key = (t.untyped_storage()._cdata, t.dtype, tuple(t.shape), t.stride(), t.storage_offset(), t._version)
        if key not in self.cache:
            self.cache[key] = (t, t.to("meta"))  # the CPU tensor is held: its address is not reused
        return self.cache[key][1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if any(t.is_meta for t in tensors):
            if func is torch.ops.aten._to_copy.default and "device" in kwargs:
                kwargs = {**kwargs, "device": torch.device("meta")}
            args, kwargs = tree_map(self._meta, args), tree_map(self._meta, kwargs)
        return func(*args, **kwargs)


class FusedAttention(TorchFunctionMode):
    """On meta, ``F.scaled_dot_product_attention`` would decompose into the math path (which saves
    the N x N probabilities); route it to the fused kernel the CPU and GPU run (flash / memory-
    efficient: saves q, k, v, out and the log-sum-exp), with a bool mask as an additive bias as
    ``sdpa`` converts it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention or not args[0].is_meta:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False), attn_mask=mask,
            scale=kwargs.get("scale"))
        return out


def _fused_on_meta(fn):
    """``fn`` under ``FusedAttention`` for meta inputs, also when backward recomputes it."""
    def run(x):
        if not x.is_meta:
            return fn(x)
        with FusedAttention():
            return fn(x)
    return run


class SavedBytes:
    """Bytes of the unique non-parameter storages saved for backward (``saved_tensors_hooks``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.seen: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []  # holds saved tensors alive: no storage address is reused

    def add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.params or key in self.seen:
            return
        self.seen[key] = st.nbytes()
        self.keep.append(t)

    @property
    def total(self) -> int:
        return sum(self.seen.values())

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t

    def checkpoint_fn(self, fn, x):
        """The model's checkpoint (torch non-reentrant) that also counts the input it keeps."""
        self.add(x)
        return torch.utils.checkpoint.checkpoint(_fused_on_meta(fn), x, use_reentrant=False)


@dataclass
class Activations:
    saved: int  # bytes saved for backward at the end of forward
    max_block: int  # largest single block's saved bytes (the recompute of one block in backward, with ckpt)
    flops: float  # training FLOPs of the micro-batch's real tokens (objective.real_token_flops)

    @property
    def peak(self) -> int:
        """Activation peak: everything saved for backward at the end of forward, plus one block's
        saved bytes (with checkpointing: the block recomputed in backward; without: the transient
        of the block whose backward is running), an upper bound."""
        return self.saved + self.max_block


def _block_meter(model: BEiT3ForPretraining, tracker: SavedBytes, sizes: list[int]) -> list[Any]:
    start: list[int] = []
    pre = lambda m, a, kw: start.append(tracker.total)  # noqa: E731
    post = lambda m, a, kw, out: sizes.append(tracker.total - start.pop())  # noqa: E731
    return [h for b in model.beit3.blocks for h in (b.register_forward_pre_hook(pre, with_kwargs=True),
                                                    b.register_forward_hook(post, with_kwargs=True))]


def run_step(model: BEiT3ForPretraining, batch: dict, grad_ckpt: bool, device: str,
             dtype: torch.dtype) -> Activations:
    """One forward (``mdm_loss``) + backward of ``model`` on ``batch``, counting saved bytes."""
    from beit3.pretrain.objective import mdm_loss

    tracker = SavedBytes(model)
    model.train()
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(grad_ckpt, tracker.checkpoint_fn if grad_ckpt else None)
    blocks: list[int] = []
    hooks = [] if grad_ckpt else _block_meter(model, tracker, blocks)
    try:
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, lambda t: t):
            result = mdm_loss(model, batch, None, torch.device("cpu"), dtype)
        saved = tracker.total
        result.loss.backward()
    finally:
        for h in hooks:
            h.remove()
        model.set_grad_checkpointing(False)
    return Activations(saved=saved, max_block=max(blocks) if blocks else 0, flops=result.flops)


def build_model(cfg: BEiT3Config, device: str = "meta", dtype: torch.dtype = torch.float32,
                seed: int = 0) -> BEiT3ForPretraining:
    torch.manual_seed(seed)
    with torch.device(device):
        model = BEiT3ForPretraining(cfg)
    return model.to(dtype)


def measure_activations(cfg: BEiT3Config, data: Any, micro: dict[str, int], dtype: torch.dtype = torch.bfloat16,
                        model: Optional[BEiT3ForPretraining] = None) -> dict[str, Activations]:
    """Activation bytes of one micro-batch on the meta device, without and with activation
    checkpointing: the bytes saved for backward (the per-block figure of the run without gives
    the recompute of one block)."""
    model = model if model is not None else build_model(cfg, "meta", dtype)
    batch = build_batch(cfg, data, micro, "meta", dtype)
    out = {}
    with FusedAttention(), MetaBridge():
        plain = run_step(model, batch, False, "meta", dtype)
        ckpt = run_step(model, build_batch(cfg, data, micro, "meta", dtype), True, "meta", dtype)
    out["no_ckpt"] = Activations(plain.saved, plain.max_block, plain.flops)
    out["ckpt"] = Activations(ckpt.saved, plain.max_block, ckpt.flops)
    return out


__all__ = ["GPUS", "HEADROOM", "ZeroSetup", "zero_setup", "model_state_bytes", "partition_numel", "zero3_buffers", "persistent_numel",
           "largest_layer_numel", "build_batch", "MetaBridge", "FusedAttention", "SavedBytes", "Activations", "run_step",
           "build_model", "measure_activations"]
