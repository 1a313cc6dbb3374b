"""Distributed evaluation plumbing: equal shards per rank, gathering of per-example outputs.

Every rank gets the same number of examples (the shard is padded by repeating its last index,
duplicates are dropped after gathering), so every rank runs the same forward passes in the
same order, which ZeRO-3 requires.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from .datasets import collate


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Indices ``rank::world_size`` padded (last index repeated) to ``ceil(n / world_size)``."""
    per = math.ceil(n / world_size) if n else 0
    idx = list(range(rank, n, world_size))
    if idx and len(idx) < per:
        idx += [idx[-1]] * (per - len(idx))
    if not idx and per:
        idx = [n - 1] * per
    return idx


def all_gather_objects(obj: Any) -> list[Any]:
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is True on any rank."""
    rank, size = world()
    if size == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([int(flag)], device=device)  # NCCL reduces CUDA tensors only
    dist.all_reduce(t)
    return bool(t.item())


def all_ranks(flag: bool) -> bool:
    return not any_rank(not flag)


def move(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Tensors to ``device``; floating tensors (images) to the model's ``dtype``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point() and k.startswith("images"):
                v = v.to(dtype)
        out[k] = v
    return out


def sharded_outputs(dataset: Dataset, batch_size: int, num_workers: int,
                    fn: Callable[[dict[str, Any]], dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], int]:
    """Run ``fn(batch) -> {name: [B, ...] tensor or list}`` over this rank's shard and gather
    per-example outputs of all ranks: ``{dataset index: {name: value}}`` and the skipped count."""
    rank, size = world()
    idx = shard_indices(len(dataset), rank, size)
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate)
    local: dict[int, dict[str, Any]] = {}
    skipped = 0
    for batch in loader:
        skipped += batch["skipped"]
        if batch["size"] == 0:
            fn_out: dict[str, Any] = {}
            continue
        fn_out = fn(batch)
        for j, i in enumerate(batch["index"].tolist()):
            local[i] = {k: (v[j].detach().float().cpu() if isinstance(v, Tensor) else v[j]) for k, v in fn_out.items()}
    merged: dict[int, dict[str, Any]] = {}
    for part in all_gather_objects(local):
        merged.update(part)
    total_skipped = sum(all_gather_objects(skipped))
    return merged, total_skipped


def stack(outputs: dict[int, dict[str, Any]], key: str, order: Optional[Iterable[int]] = None) -> Tensor:
    keys = sorted(outputs) if order is None else list(order)
    return torch.stack([outputs[i][key] for i in keys])


__all__ = ["world", "shard_indices", "all_gather_objects", "any_rank", "all_ranks", "move", "sharded_outputs",
           "stack"]
