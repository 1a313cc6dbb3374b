"""``NormEMAQuantizer``: L2-normalised codebook, nearest code by cosine, straight-through estimator,
commitment loss, EMA codebook update (counts and sums all-reduced across ranks, renormalised, unused
codes keep their vectors), optional cosine k-means initialisation on the first batch, ``reseed_``."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


logger = logging.getLogger("beit3.model.vqkd")


# ---------------------------------------------------------------------------------------------
# Quantizer
# ---------------------------------------------------------------------------------------------
def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` in place over all ranks (no-op in a single process)."""
    if _dist_world() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    if _dist_world() > 1:
        dist.broadcast(t, src=src)
    return t


def kmeans_cosine(samples: Tensor, num_clusters: int, num_iters: int = 10,
                  generator: Optional[torch.Generator] = None,
                  init: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Spherical k-means (BEiT v2's codebook init) on L2-normalised ``samples [N, D]``.

    Initial means: ``init`` or ``num_clusters`` samples drawn without replacement (with
    replacement when N < K). Each iteration assigns by max dot product, averages, renormalises;
    empty clusters keep their mean. Returns ``(means [K, D], counts [K])`` where ``counts`` are
    the assignment counts of the last iteration.
    """
    n, d = samples.shape
    if init is not None:
        means = init.clone()
    elif n >= num_clusters:
        means = samples[torch.randperm(n, generator=generator, device="cpu")[:num_clusters].to(samples.device)]
    else:
        means = samples[torch.randint(0, n, (num_clusters,), generator=generator, device="cpu").to(samples.device)]
    counts = torch.zeros(num_clusters, dtype=samples.dtype, device=samples.device)
    for _ in range(num_iters):
        buckets = (samples @ means.t()).argmax(dim=-1)  # [N]
        counts = torch.bincount(buckets, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)  # [K, D]
        new = F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1)
        means = torch.where((counts == 0)[:, None], means, new)
    return means, counts


class CodebookEMA(nn.Module):
    """Codebook state, in the released key layout (``quantize.embedding.*``).

    ``weight [K, D]`` (unit rows), ``cluster_size [K]``, ``embed_avg [K, D]`` (kept for layout
    compatibility), ``initted [1]``. All are fp32 buffers: module-wide dtype casts (``.half()``,
    DeepSpeed bf16) do not touch them, so the EMA keeps full precision.
    """

    def __init__(self, num_codes: int, code_dim: int, kmeans_init: bool) -> None:
        super().__init__()
        weight = torch.zeros(num_codes, code_dim) if kmeans_init else F.normalize(torch.randn(num_codes, code_dim), dim=-1)
        self.register_buffer("weight", weight)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_avg", weight.clone())
        self.register_buffer("initted", torch.tensor([float(not kmeans_init)]))

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self


@dataclass
class QuantizerOutput:
    z_q: Tensor       # [B, N, D] straight-through quantized vectors
    loss: Tensor      # scalar commitment loss
    codes: Tensor     # [B, N] long
    counts: Tensor    # [K] assignment counts of this step, summed over ranks (training) or local
    z: Tensor         # [B*N, D] L2-normalised encoder vectors (detached): pool for re-seeding


class NormEMAQuantizer(nn.Module):
    """Cosine vector quantizer with an EMA-updated, L2-normalised codebook (BEiT v2)."""

    def __init__(self, num_codes: int, code_dim: int, decay: float = 0.99, beta: float = 1.0,
                 kmeans_init: bool = True, kmeans_iters: int = 10) -> None:
        super().__init__()
        self.num_codes, self.code_dim = num_codes, code_dim
        self.decay, self.beta = decay, beta
        self.kmeans_iters = kmeans_iters
        self.update = True  # EMA updates in training mode
        self.embedding = CodebookEMA(num_codes, code_dim, kmeans_init)
        self.register_buffer("cluster_size", torch.zeros(num_codes))  # EMA of code usage

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        if self.cluster_size.dtype != torch.float32:
            self._buffers["cluster_size"] = self.cluster_size.float()
        return self

    @property
    def codebook(self) -> Tensor:
        return self.embedding.weight

    def nearest(self, z: Tensor) -> Tensor:
        """Code ids of L2-normalised vectors ``z [..., D]`` (max cosine, fp32)."""
        return (z.float() @ self.codebook.t()).argmax(dim=-1)

    @torch.no_grad()
    def init_codebook_(self, z: Tensor, seed: int = 0) -> None:
        """k-means initialisation on the (all-gathered) first batch ``z [N, D]`` (normalised)."""
        if _dist_world() > 1:
            parts = [torch.empty_like(z) for _ in range(_dist_world())]
            dist.all_gather(parts, z.contiguous())
            z = torch.cat(parts)
        gen = torch.Generator().manual_seed(seed)
        means, counts = kmeans_cosine(z.float(), self.num_codes, self.kmeans_iters, generator=gen)
        broadcast_(means)
        broadcast_(counts)
        self.embedding.weight.copy_(means)
        self.embedding.cluster_size.copy_(counts)
        self.embedding.initted.fill_(1.0)
        logger.info("k-means initialised the codebook on %d vectors: %d of %d codes have members",
                    z.shape[0], int((counts > 0).sum()), self.num_codes)

    @torch.no_grad()
    def ema_update_(self, z: Tensor, codes: Tensor) -> Tensor:
        """One EMA step from normalised ``z [N, D]`` and their ``codes [N]``; returns global counts.

        Counts and per-code sums are all-reduced; the per-code mean is renormalised and blended
        into the codebook (``w <- l2norm(d*w + (1-d)*l2norm(mean))``); codes without members keep
        their vector.
        """
        counts = torch.bincount(codes, minlength=self.num_codes).float()  # [K]
        sums = torch.zeros(self.num_codes, self.code_dim, device=z.device).index_add_(0, codes, z.float())
        all_reduce_sum(counts)
        all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        unused = counts == 0
        mean = F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1)
        mean = torch.where(unused[:, None], self.codebook, mean)
        blended = self.codebook * self.decay + mean * (1 - self.decay)
        self.embedding.weight.copy_(F.normalize(blended, dim=-1))
        return counts

    @torch.no_grad()
    def reseed_(self, dead: Tensor, pool: Tensor, seed: int = 0) -> int:
        """Replace the codes flagged in ``dead [K]`` by vectors drawn from ``pool [N, D]``
        (normalised encoder outputs). Chosen on rank 0 and broadcast, so all ranks agree."""
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(0, pool.shape[0], (n_dead,), generator=gen).to(pool.device)
        new = F.normalize(pool[pick].float(), dim=-1)
        broadcast_(new)
        idx = dead.nonzero().squeeze(1)
        self.embedding.weight[idx] = new
        return n_dead

    def forward(self, z: Tensor) -> QuantizerOutput:
        """``z [B, N, D]`` (any dtype) -> straight-through quantization in fp32."""
        B, N, D = z.shape
        z = F.normalize(z.float(), dim=-1)
        flat = z.reshape(-1, D)  # [B*N, D]
        if self.training and not bool(self.embedding.initted.item()):
            self.init_codebook_(flat.detach())
        codes = self.nearest(flat)  # [B*N]
        z_q = F.embedding(codes, self.codebook).view(B, N, D)
        if self.training and self.update:
            counts = self.ema_update_(flat.detach(), codes)
        else:
            counts = torch.bincount(codes, minlength=self.num_codes).float()
        loss = self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()  # straight-through
        return QuantizerOutput(z_q=z_q, loss=loss, codes=codes.view(B, N), counts=counts, z=flat.detach())
