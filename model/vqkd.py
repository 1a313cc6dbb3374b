"""BEiT v2 VQ-KD image tokenizer (vector-quantized knowledge distillation), plain PyTorch.

The tokenizer turns an image into one discrete visual token per patch; BEiT-3's masked image
modeling predicts these tokens at the masked patches.

- ``VisionTransformer``: the released tokenizer's ViT (q and v biases, no k bias, LayerNorm eps
  1e-6, absolute positions, patch tokens through ``fc_norm``); used as encoder (image ->
  patch features) and decoder (code map, patch size 1 -> patch features).
- ``NormEMAQuantizer``: L2-normalised codebook, nearest code by cosine, straight-through
  estimator, commitment loss, EMA codebook update (counts and sums all-reduced across ranks,
  renormalised, unused codes keep their vectors), optional cosine k-means initialisation on the
  first batch, and ``reseed_`` to re-seed dead codes.
- ``VQKD``: encoder -> ``encode_task_layer`` (fp32) -> quantizer -> decoder ->
  ``decode_task_layer`` (to the teacher's feature width); ``codes(images)`` for targets.
- Teachers for training (``ClipVisionTeacher``, ``DinoTeacher``, ``BEiT3VisionTeacher``): frozen
  feature extractors loaded from local state dicts.
- Official checkpoints: ``filter_official_state_dict``, ``config_from_state_dict``,
  ``load_tokenizer`` (our file or a released ``vqkd_encoder_base_decoder_*`` file),
  ``save_tokenizer``.

Images come in as float ``[B, 3, H, W]`` in [0, 1]; the tokenizer maps them to [-1, 1] itself.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import ConfigError, FlatConfig
from .safe_load import load_untrusted

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFICIAL_DROPPED_PREFIXES = ("loss", "teacher", "scaling")
FORMAT_TAG = "beit3-vqkd"


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VQKDConfig(FlatConfig):
    """Size and quantizer settings of a VQ-KD tokenizer (validated once, unknown keys rejected).

    The patch grid ``img_size // patch_size`` must equal the BEiT-3 model's patch grid.
    ``teacher_dim`` is the width of the regressed teacher features (512 CLIP ViT-B/16, 768 DINO).
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    decoder_embed_dim: int = 768
    decoder_depth: int = 3
    decoder_num_heads: int = 12
    num_codes: int = 8192
    code_dim: int = 32
    teacher_dim: int = 512
    ema_decay: float = 0.99
    commitment_beta: float = 1.0
    kmeans_init: bool = True
    kmeans_iters: int = 10
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"VQKDConfig.{name}={getattr(self, name)!r}: {msg}")

        for name in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                     "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "num_codes",
                     "code_dim", "teacher_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, "must be a positive integer")
        if self.img_size % self.patch_size:
            fail("img_size", f"must be divisible by patch_size={self.patch_size}")
        if self.embed_dim % self.num_heads:
            fail("embed_dim", f"must be divisible by num_heads={self.num_heads}")
        if self.decoder_embed_dim % self.decoder_num_heads:
            fail("decoder_embed_dim", f"must be divisible by decoder_num_heads={self.decoder_num_heads}")
        if not 0.0 < self.ema_decay < 1.0:
            fail("ema_decay", "must be in (0, 1)")
        if self.commitment_beta < 0:
            fail("commitment_beta", "must be >= 0")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 0:
            fail("kmeans_iters", "must be a non-negative integer")
        if self.mlp_ratio <= 0:
            fail("mlp_ratio", "must be positive")
        if self.layer_norm_eps <= 0:
            fail("layer_norm_eps", "must be positive")


# Presets. ``base`` is the recommended release (decoder 3x768x12, CLIP teacher, 97% usage).
VQKD_PRESETS: dict[str, VQKDConfig] = {
    "tiny": VQKDConfig(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                       decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4,
                       num_codes=128, code_dim=16, teacher_dim=64),
    "base": VQKDConfig(decoder_depth=3, teacher_dim=512),
    "base_1x768x12_clip": VQKDConfig(decoder_depth=1, teacher_dim=512),
    "base_3x768x12_clip": VQKDConfig(decoder_depth=3, teacher_dim=512),
    "base_1x768x12_dino": VQKDConfig(decoder_depth=1, teacher_dim=768),
}


def get_vqkd_config(preset: str, **overrides: Any) -> VQKDConfig:
    """A preset with validated overrides, e.g. ``get_vqkd_config("base", decoder_depth=1)``."""
    if preset not in VQKD_PRESETS:
        raise ConfigError(f"preset={preset!r}: unknown VQ-KD preset; choose one of {sorted(VQKD_PRESETS)}")
    return VQKD_PRESETS[preset].replace(**overrides)


# ---------------------------------------------------------------------------------------------
# ViT (released tokenizer layout)
# ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with q and v biases and no k bias (BEiT layout)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias.to(self.qkv.weight.dtype))  # [B, N, 3C]
        q, k, v = qkv.view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, N, Dh]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, Dh]
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x += attn(norm1(x)); x += mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, P, D]


class VisionTransformer(nn.Module):
    """ViT returning its patch tokens through ``fc_norm`` (mean-pooling layout, no final norm)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.grid = img_size // patch_size
        self.patch_embed = PatchEmbed(in_chans, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid ** 2 + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, eps) for _ in range(depth))
        self.fc_norm = nn.LayerNorm(dim, eps=eps)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for i, blk in enumerate(self.blocks):  # BEiT's depth-scaled init of the residual outputs
            blk.attn.proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))
            blk.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # [B, P, D]
        if x.shape[1] != self.grid ** 2:
            raise ValueError(f"input gives {x.shape[1]} patches; this ViT expects {self.grid ** 2} "
                             f"({self.grid}x{self.grid})")
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # [B, 1+P, D]
        x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.fc_norm(x[:, 1:])  # [B, P, D]


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


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
@dataclass
class VQKDOutput:
    loss: Tensor          # rec_loss + quant_loss
    rec_loss: Tensor      # 1 - cosine(decoder output, teacher features), mean over patches
    quant_loss: Tensor    # commitment loss
    codes: Tensor         # [B, P]
    counts: Tensor        # [K]
    z: Tensor             # [B*P, code_dim] normalised encoder vectors (detached)


def default_codes_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device runs it natively (CUDA with bf16 support), else fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class VQKD(nn.Module):
    """BEiT v2 VQ-KD tokenizer; state-dict keys follow the released checkpoints."""

    def __init__(self, cfg: VQKDConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = VisionTransformer(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim,
                                         cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.layer_norm_eps)
        self.decoder = VisionTransformer(cfg.grid_size, 1, cfg.code_dim, cfg.decoder_embed_dim,
                                         cfg.decoder_depth, cfg.decoder_num_heads, cfg.mlp_ratio,
                                         cfg.layer_norm_eps)
        self.quantize = NormEMAQuantizer(cfg.num_codes, cfg.code_dim, cfg.ema_decay,
                                         cfg.commitment_beta, cfg.kmeans_init, cfg.kmeans_iters)
        self.encode_task_layer = nn.Sequential(
            nn.Linear(cfg.embed_dim, cfg.embed_dim), nn.Tanh(), nn.Linear(cfg.embed_dim, cfg.code_dim))
        self.decode_task_layer = nn.Sequential(
            nn.Linear(cfg.decoder_embed_dim, cfg.decoder_embed_dim), nn.Tanh(),
            nn.Linear(cfg.decoder_embed_dim, cfg.teacher_dim))
        for m in (*self.encode_task_layer, *self.decode_task_layer):
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed", "decoder.cls_token", "decoder.pos_embed"}

    @staticmethod
    def preprocess(images: Tensor) -> Tensor:
        """[0, 1] -> [-1, 1] (BEiT v2 tokenizer convention)."""
        return images * 2.0 - 1.0

    def _check_images(self, images: Tensor) -> None:
        cfg = self.config
        if images.dim() != 4 or images.shape[1] != cfg.in_chans or images.shape[-2:] != (cfg.img_size, cfg.img_size):
            raise ValueError(f"tokenizer expects images [B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size}] "
                             f"in [0, 1], got {tuple(images.shape)}")

    def encode(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` in [0, 1] -> pre-quantization vectors ``[B, P, code_dim]`` (fp32)."""
        self._check_images(images)
        x = self.preprocess(images).to(self.encoder.patch_embed.proj.weight.dtype)
        feats = self.encoder(x)  # [B, P, D]
        with torch.autocast(device_type=feats.device.type, enabled=False):
            w = self.encode_task_layer[-1].weight
            return self.encode_task_layer(feats.to(w.dtype)).float()  # [B, P, code_dim]

    def decode(self, z_q: Tensor) -> Tensor:
        """``z_q [B, P, code_dim]`` -> reconstructed teacher features ``[B, P, teacher_dim]``."""
        B, P, C = z_q.shape
        g = self.config.grid_size
        w = self.decoder.patch_embed.proj.weight
        grid = z_q.transpose(1, 2).reshape(B, C, g, g).to(w.dtype)  # [B, C, g, g]
        return self.decode_task_layer(self.decoder(grid))  # [B, P, teacher_dim]

    def forward(self, images: Tensor, teacher_features: Tensor) -> VQKDOutput:
        """Training forward: ``images [B, 3, H, W]`` in [0, 1], ``teacher_features [B, P, T]``."""
        q = self.quantize(self.encode(images))
        rec = self.decode(q.z_q)  # [B, P, T]
        cos = F.cosine_similarity(rec.float(), teacher_features.float(), dim=-1)  # [B, P]
        rec_loss = (1 - cos).mean()
        return VQKDOutput(loss=rec_loss + q.loss, rec_loss=rec_loss, quant_loss=q.loss,
                          codes=q.codes, counts=q.counts, z=q.z)

    @torch.no_grad()
    def codes(self, images: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Visual tokens ``LongTensor [B, P]`` of ``images [B, 3, H, W]`` in [0, 1].

        No grad; the encoder runs under autocast in ``dtype`` (default: bf16 on CUDA where
        supported, else fp32); the task layer and the codebook search run in fp32. Does not
        change the train/eval mode or the codebook.
        """
        dtype = dtype or default_codes_dtype(images.device)
        with torch.autocast(device_type=images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            z = self.encode(images)  # [B, P, code_dim] fp32
        return self.quantize.nearest(F.normalize(z, dim=-1))  # [B, P]


# ---------------------------------------------------------------------------------------------
# Checkpoints: our format and the released BEiT v2 files
# ---------------------------------------------------------------------------------------------
def filter_official_state_dict(state: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tokenizer weights of a released VQ-KD file: unwraps ``model`` (or ``state_dict``)
    and drops keys starting with ``loss``, ``teacher`` or ``scaling``."""
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    elif "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    return {k: v for k, v in state.items() if not k.startswith(OFFICIAL_DROPPED_PREFIXES)}


def config_from_state_dict(state: Mapping[str, Tensor], **overrides: Any) -> VQKDConfig:
    """Infer the architecture from a (filtered) tokenizer state dict's shapes."""
    def depth(prefix: str) -> int:
        ids = {int(k.split(".")[2]) for k in state if k.startswith(f"{prefix}.blocks.")}
        return max(ids) + 1 if ids else 0

    try:
        proj = state["encoder.patch_embed.proj.weight"]  # [D, 3, p, p]
        embed_dim, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
        num_patches = state["encoder.pos_embed"].shape[1] - 1
        codebook = state["quantize.embedding.weight"]  # [K, C]
        dec_dim = state["decoder.patch_embed.proj.weight"].shape[0]
        hidden = state["encoder.blocks.0.mlp.fc1.weight"].shape[0]
        teacher_dim = state["decode_task_layer.2.weight"].shape[0]
    except KeyError as err:
        raise ConfigError(f"not a VQ-KD tokenizer state dict: missing key {err}") from None
    grid = int(round(math.sqrt(num_patches)))
    fields = dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim,
                  depth=depth("encoder"), num_heads=max(1, embed_dim // 64), mlp_ratio=hidden / embed_dim,
                  decoder_embed_dim=dec_dim, decoder_depth=depth("decoder"),
                  decoder_num_heads=max(1, dec_dim // 64), num_codes=codebook.shape[0],
                  code_dim=codebook.shape[1], teacher_dim=teacher_dim)
    fields.update(overrides)
    return VQKDConfig.from_dict(fields)


def _plain(value: Any) -> Any:
    """``value`` as str/int/float/bool/None, lists and str-keyed dicts (a weights-only payload)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    raise TypeError(f"tokenizer config value {value!r} ({type(value).__name__}) is not a plain value")


def save_tokenizer(model: VQKD, path: str) -> None:
    """Write our tokenizer file: ``{"format", "config", "model"}`` (atomic), plain str/dict/tensors
    only, so that :func:`load_tokenizer` reads it with ``weights_only=True``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tmp = f"{path}.tmp"
    torch.save({"format": FORMAT_TAG, "config": _plain(model.config.to_dict()), "model": state}, tmp)
    os.replace(tmp, path)


def load_tokenizer(path_or_state: str | Mapping[str, Any], map_location: str | torch.device = "cpu",
                   **overrides: Any) -> VQKD:
    """A frozen tokenizer (eval mode, no grad) from our file or a released BEiT v2 file.

    Our files carry their config; for released files the architecture is inferred from the
    weights (heads: width / 64; pass ``num_heads=...`` to override). Loading is strict.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        if not os.path.isfile(path_or_state):
            raise FileNotFoundError(f"tokenizer checkpoint not found: {path_or_state}")
        blob = load_untrusted(path_or_state, map_location)  # weights only: a pickle with code is refused
    else:
        blob = path_or_state
    if blob.get("format") == FORMAT_TAG:
        cfg = VQKDConfig.from_dict({**blob["config"], **overrides})
        state = dict(blob["model"])
    else:
        state = filter_official_state_dict(blob)
        cfg = config_from_state_dict(state, **overrides)
    model = VQKD(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"tokenizer checkpoint does not match VQKD({cfg}): missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    if not bool(model.quantize.embedding.initted.item()):
        raise ValueError("tokenizer checkpoint has an uninitialised codebook (quantize.embedding.initted == 0)")
    return freeze(model)


def freeze(model: VQKD) -> VQKD:
    """Eval mode, no grad, no EMA updates."""
    model.eval()
    model.quantize.update = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# Teachers (frozen, loaded from local state dicts; never downloaded)
# ---------------------------------------------------------------------------------------------
class _ClipResidualBlock(nn.Module):
    """OpenAI CLIP ``ResidualAttentionBlock`` (QuickGELU, fused in_proj)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, 4 * dim))
        self.mlp.add_module("c_proj", nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


class ClipVisionTeacher(nn.Module):
    """CLIP ViT image tower; features = ``ln_post(patch tokens) @ proj`` (BEiT v2's CLIP target).

    Keys follow OpenAI CLIP's ``visual.*`` (``conv1``, ``class_embedding``,
    ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.*``, ``ln_post``, ``proj``).
    """

    mean, std = CLIP_MEAN, CLIP_STD

    def __init__(self, img_size: int, patch_size: int, width: int, depth: int, heads: int, out_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        n = (img_size // patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(n, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[_ClipResidualBlock(width, heads) for _ in range(depth)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out_dim) * width ** -0.5)

    @property
    def out_dim(self) -> int:
        return self.proj.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, P, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer.resblocks(self.ln_pre(x))
        return self.ln_post(x[:, 1:]) @ self.proj  # [B, P, out_dim]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> "ClipVisionTeacher":
        if any(k.startswith("visual.") for k in state):  # a full CLIP model: keep the image tower
            state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        width, _, patch, _ = state["conv1.weight"].shape
        depth = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
        grid = int(round(math.sqrt(state["positional_embedding"].shape[0] - 1)))
        model = cls(grid * patch, patch, width, depth, max(1, width // 64), state["proj"].shape[1])
        model.load_state_dict(state, strict=True)
        return model


class DinoTeacher(nn.Module):
    """DINO / timm ViT layout (``patch_embed.proj``, ``cls_token``, ``pos_embed``,
    ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``); features = final
    norm of the patch tokens."""

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, img_size: int, patch_size: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(3, width, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch_size) ** 2 + 1, width) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.norm1 = nn.LayerNorm(width, eps=1e-6)
            blk.attn = nn.Module()
            blk.attn.qkv = nn.Linear(width, 3 * width)
            blk.attn.proj = nn.Linear(width, width)
            blk.norm2 = nn.LayerNorm(width, eps=1e-6)
            blk.mlp = Mlp(width, 4 * width)
            self.blocks.append(blk)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.heads = heads

    @property
    def out_dim(self) -> int:
        return self.norm.weight.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1) + self.pos_embed.to(x.dtype)
        B, N, C = x.shape
        for blk in self.blocks:
            q, k, v = blk.attn.qkv(blk.norm1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            x = x + blk.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))
            x = x + blk.mlp(blk.norm2(x))
        return self.norm(x)[:, 1:]  # [B, P, C]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> "DinoTeacher":
        state = {k: v for k, v in state.items() if not k.startswith("head")}
        width, _, patch, _ = state["patch_embed.proj.weight"].shape
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        grid = int(round(math.sqrt(state["pos_embed"].shape[1] - 1)))
        model = cls(grid * patch, patch, width, depth, max(1, width // 64))
        model.load_state_dict(state, strict=True)
        return model


class BEiT3VisionTeacher(nn.Module):
    """The vision path of one of this project's BEiT-3 checkpoints; features = patch tokens of
    the final layer (normalised output)."""

    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def out_dim(self) -> int:
        return self.backbone.config.embed_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(images=x).vision[:, 1:]  # [B, P, D]


class FrozenTeacher(nn.Module):
    """A teacher with its own input normalisation: ``[0, 1]`` images -> patch features."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def out_dim(self) -> int:
        return self.net.out_dim

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        return self.net(x).float()  # [B, P, out_dim]


TEACHER_KINDS = ("clip", "dino", "beit3")


def build_teacher(kind: str, state: Mapping[str, Tensor], beit3_preset: str = "base") -> FrozenTeacher:
    """A frozen teacher from a local state dict. ``kind``: ``clip`` (OpenAI CLIP, full model or
    ``visual.*``), ``dino`` (timm/DINO ViT) or ``beit3`` (this project's checkpoint, keys
    ``beit3.*`` or bare, architecture ``beit3_preset``)."""
    if kind == "clip":
        net: nn.Module = ClipVisionTeacher.from_state_dict(state)
        return FrozenTeacher(net, CLIP_MEAN, CLIP_STD)
    if kind == "dino":
        return FrozenTeacher(DinoTeacher.from_state_dict(state), IMAGENET_MEAN, IMAGENET_STD)
    if kind == "beit3":
        from .beit3 import BEiT3
        from .config import get_config
        backbone = BEiT3(get_config(beit3_preset))
        sub = {k[len("beit3."):]: v for k, v in state.items() if k.startswith("beit3.")} or dict(state)
        backbone.load_state_dict(sub, strict=True)
        return FrozenTeacher(BEiT3VisionTeacher(backbone), BEiT3VisionTeacher.mean, BEiT3VisionTeacher.std)
    raise ConfigError(f"teacher kind={kind!r}: choose one of {TEACHER_KINDS}")


__all__ = [
    "VQKDConfig", "VQKD_PRESETS", "get_vqkd_config", "VQKD", "VQKDOutput", "NormEMAQuantizer",
    "QuantizerOutput", "CodebookEMA", "VisionTransformer", "kmeans_cosine", "filter_official_state_dict",
    "config_from_state_dict", "load_tokenizer", "save_tokenizer", "freeze", "ClipVisionTeacher",
    "DinoTeacher", "BEiT3VisionTeacher", "FrozenTeacher", "build_teacher", "TEACHER_KINDS",
]
