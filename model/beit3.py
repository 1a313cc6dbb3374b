"""The Multiway Transformer (BEiT-3 backbone), in plain PyTorch.

One self-attention over the joint sequence; per-modality experts chosen by argument
(``Modality``), never by state set during forward. Two layouts (see ``BEiT3Config``):
``released`` splits every projection, LayerNorm and FFN per modality; ``paper`` shares the
attention and adds a vision-language FFN expert in the top layers.
"""
from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .attention import attention
from .config import BEiT3Config

POSITION_OFFSET = 2  # fairseq convention: positions start at 2 in each segment


class Modality(str, enum.Enum):
    """What the input sequence holds; decides which experts run."""

    VISION = "vision"
    TEXT = "text"
    FUSED = "fused"  # vision tokens first, then text tokens


class Multiway(nn.Module):
    """Per-modality experts of one sub-module: ``vision``, ``language``, optional ``vision_language``.

    Vision input goes through ``vision``, text through ``language``; a fused sequence is split
    at ``split`` (vision first) unless a ``vision_language`` expert exists, which then takes the
    whole fused sequence.
    """

    def __init__(self, make: Callable[[], nn.Module], vision_language: bool = False) -> None:
        super().__init__()
        self.vision = make()
        self.language = make()
        self.vision_language = make() if vision_language else None

    def forward(self, x: Tensor, modality: Modality, split: int) -> Tensor:
        if modality is Modality.VISION:
            return self.vision(x)
        if modality is Modality.TEXT:
            return self.language(x)
        if self.vision_language is not None:
            return self.vision_language(x)
        # x: [B, N, D] -> vision part [B, split, D], language part [B, N - split, D]
        return torch.cat([self.vision(x[:, :split]), self.language(x[:, split:])], dim=1)


def routed(module: nn.Module, x: Tensor, modality: Modality, split: int) -> Tensor:
    """Call a Multiway module with its route, or a shared module as it is."""
    if isinstance(module, Multiway):
        return module(x, modality, split)
    return module(x)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth per sample."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


@dataclass
class KVCache:
    """Keys/values of the tokens seen so far, per layer, for incremental decoding (captioning).

    Fill it with a first ``forward(images, text_ids, causal_text=True, kv_cache=KVCache())``;
    later calls pass only the new ``text_ids`` ``[B, n]`` and attend to everything cached.
    """

    keys: list[Tensor] = field(default_factory=list)  # per layer [B, H, T, Dh]
    values: list[Tensor] = field(default_factory=list)
    text_length: int = 0  # text tokens cached (next text position = text_length + 2)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this layer's new keys/values and return the full ones."""
        if layer < len(self.keys):
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        else:
            self.keys.append(k)
            self.values.append(v)
        return self.keys[layer], self.values[layer]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]


class FeedForward(nn.Module):
    """One FFN expert with Sub-LN: LN -> fc1 -> GELU (fp32) -> LN -> fc2."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_dim)
        self.inner_norm = nn.LayerNorm(cfg.ffn_dim, eps=cfg.layer_norm_eps)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc1(self.norm(x))  # [B, N, F]
        h = F.gelu(h.float()).type_as(h)
        return self.dropout(self.fc2(self.inner_norm(h)))  # [B, N, D]


class MultiwayAttention(nn.Module):
    """Self-attention with Sub-LN; projections per modality (released) or shared (paper)."""

    def __init__(self, cfg: BEiT3Config, per_modality: bool) -> None:
        super().__init__()
        D = cfg.embed_dim

        def wrap(make: Callable[[], nn.Module]) -> nn.Module:
            return Multiway(make) if per_modality else make()

        self.num_heads = cfg.num_heads
        self.qkv = wrap(lambda: nn.Linear(D, 3 * D))  # q, k, v stacked: one GEMM per expert
        self.inner_norm = wrap(lambda: nn.LayerNorm(D, eps=cfg.layer_norm_eps))
        self.proj = wrap(lambda: nn.Linear(D, D))
        self.attn_dropout = cfg.attn_dropout
        self.backend = cfg.attn_backend

    def forward(self, x: Tensor, modality: Modality, split: int,
                key_padding_mask: Optional[Tensor] = None, prefix_len: Optional[int] = None,
                attn_mask: Optional[Tensor] = None,
                cache: Optional[tuple[KVCache, int]] = None) -> Tensor:
        B, N, D = x.shape
        H = self.num_heads
        qkv = routed(self.qkv, x, modality, split)  # [B, N, 3D]
        q, k, v = qkv.view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each [B, H, N, Dh]
        if cache is not None:
            kv_cache, layer = cache
            k, v = kv_cache.update(layer, k, v)  # [B, H, T + N, Dh]
        o = attention(q, k, v, key_padding_mask=key_padding_mask, prefix_len=prefix_len,
                      attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0,
                      backend=self.backend)  # [B, H, N, Dh]
        o = o.transpose(1, 2).reshape(B, N, D)
        o = routed(self.inner_norm, o, modality, split)
        return routed(self.proj, o, modality, split)  # [B, N, D]


class MultiwayBlock(nn.Module):
    """Pre-LN block: ``x += drop_path(attn(ln(x)))``; ``x += drop_path(ffn(x))``."""

    def __init__(self, cfg: BEiT3Config, drop_path_rate: float, vision_language: bool,
                 index: int = 0) -> None:
        super().__init__()
        self.index = index
        per_modality = cfg.layout == "released"
        make_norm = lambda: nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)  # noqa: E731
        self.attn_norm = Multiway(make_norm) if per_modality else make_norm()
        self.attn = MultiwayAttention(cfg, per_modality)
        self.ffn = Multiway(lambda: FeedForward(cfg), vision_language=vision_language)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: Tensor, modality: Optional[Modality] = None, split: int = 0,
                key_padding_mask: Optional[Tensor] = None, prefix_len: Optional[int] = None,
                attn_mask: Optional[Tensor] = None, kv_cache: Optional[KVCache] = None,
                packed: Optional[Any] = None) -> Tensor:
        """``x [B, N, D]`` of one ``modality``; or, with ``packed`` (a ``model.packed.PackedLayout``),
        the packed stream ``[T, D]`` of a whole micro-batch (see ``model/packed.py``)."""
        if packed is not None:
            return packed.run_block(self, x)  # [T, D]
        if modality is None:
            raise ValueError("MultiwayBlock.forward needs a modality (or a packed layout)")
        h = routed(self.attn_norm, x, modality, split)
        cache = (kv_cache, self.index) if kv_cache is not None else None
        h = self.attn(h, modality, split, key_padding_mask, prefix_len, attn_mask, cache)
        x = x + drop_path(self.dropout(h), self.drop_path_rate, self.training)
        h = self.ffn(x, modality, split)
        return x + drop_path(h, self.drop_path_rate, self.training)  # [B, N, D]


class VisionEmbedding(nn.Module):
    """Patch projection, learnable mask token for masked patches, CLS prepended."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, images: Tensor, masked: Optional[Tensor] = None) -> Tensor:
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model expects "
                             f"{self.img_size}x{self.img_size} (set img_size and interpolate positions)")
        x = self.proj(images).flatten(2).transpose(1, 2)  # [B, P, D]
        if masked is not None:
            w = masked.unsqueeze(-1).type_as(x)  # [B, P, 1]
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)  # [B, 1 + P, D]


@dataclass
class BEiT3Output:
    """Backbone output: hidden states ``[B, N, D]``, the vision/text split position and mode."""

    hidden: Tensor
    split: int
    modality: Modality

    @property
    def vision(self) -> Tensor:
        """Vision tokens (CLS first) ``[B, split, D]``."""
        return self.hidden[:, : self.split]

    @property
    def text(self) -> Tensor:
        """Text tokens ``[B, N - split, D]``."""
        return self.hidden[:, self.split:]


class BEiT3(nn.Module):
    """Multiway Transformer backbone: vision-only, text-only or fused image+text forward."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.config = cfg
        D = cfg.embed_dim
        self.text_embed = nn.Embedding(cfg.vocab_size, D)
        self.vision_embed = VisionEmbedding(cfg)
        self.vision_pos = nn.Embedding(cfg.num_vision_tokens + POSITION_OFFSET, D)
        self.text_pos = nn.Embedding(cfg.max_text_positions, D)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path_rate * i / max(1, cfg.depth - 1) for i in range(cfg.depth)]  # linspace
        first_vl = cfg.depth - cfg.num_vl_layers
        self.blocks = nn.ModuleList(
            MultiwayBlock(cfg, rates[i], vision_language=i >= first_vl, index=i) for i in range(cfg.depth))
        make_norm = lambda: nn.LayerNorm(D, eps=cfg.layer_norm_eps)  # noqa: E731
        self.norm = Multiway(make_norm) if cfg.normalize_output else None
        self.grad_checkpointing = False
        self._checkpoint_fn: Optional[Callable[..., Tensor]] = None
        self.init_weights()

    # ---- hooks ------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """The official release's init. The unilm wrapper's ``_init_weights`` touches only Linear
        (trunc-normal std ``init_std`` cut at +-std, zero bias) and LayerNorm (1/0); everything else
        keeps torchscale's own init: text embedding N(0, D^-0.5), both position tables PyTorch's
        ``nn.Embedding`` default N(0, 1), the patch Conv2d PyTorch's default, cls/mask tokens zeros."""
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-std, b=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.text_embed.weight, mean=0.0, std=self.config.embed_dim ** -0.5)
        self.vision_pos.reset_parameters()
        self.text_pos.reset_parameters()
        self.vision_embed.proj.reset_parameters()
        nn.init.zeros_(self.vision_embed.cls_token)
        nn.init.zeros_(self.vision_embed.mask_token)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides norms and biases."""
        return {"vision_embed.cls_token", "vision_embed.mask_token", "vision_pos.weight", "text_pos.weight"}

    def set_grad_checkpointing(self, enable: bool = True,
                               checkpoint_fn: Optional[Callable[..., Tensor]] = None) -> None:
        """Recompute each block in backward. ``checkpoint_fn(fn, x)`` defaults to
        ``torch.utils.checkpoint`` (non-reentrant); ``pretrain/`` may pass DeepSpeed's."""
        self.grad_checkpointing = enable
        self._checkpoint_fn = checkpoint_fn

    # ---- forward ----------------------------------------------------------------------------
    def embed(self, images: Optional[Tensor], text_ids: Optional[Tensor],
              image_mask: Optional[Tensor], text_start: int = 0) -> tuple[Tensor, Modality, int]:
        """Token + position embeddings of the joint sequence ``[B, N, D]``, its modality and split."""
        parts = []
        if images is not None:
            xv = self.vision_embed(images, image_mask)  # [B, 1 + P, D]
            pos = torch.arange(POSITION_OFFSET, xv.shape[1] + POSITION_OFFSET, device=xv.device)
            parts.append(xv + self.vision_pos(pos).to(xv.dtype))
        if text_ids is not None:
            L = text_ids.shape[1]
            first = POSITION_OFFSET + text_start
            if first + L > self.config.max_text_positions:
                raise ValueError(f"text length {text_start + L} exceeds max_text_positions - 2 = "
                                 f"{self.config.max_text_positions - POSITION_OFFSET}")
            xt = self.text_embed(text_ids)  # [B, L, D]
            pos = torch.arange(first, first + L, device=xt.device)
            parts.append(xt + self.text_pos(pos).to(xt.dtype))
        if not parts:
            raise ValueError("BEiT3.forward needs images, text_ids or both")
        if images is not None and text_ids is not None:
            return torch.cat(parts, dim=1), Modality.FUSED, parts[0].shape[1]
        if images is not None:
            return parts[0], Modality.VISION, parts[0].shape[1]
        return parts[0], Modality.TEXT, 0

    def forward(self, images: Optional[Tensor] = None, text_ids: Optional[Tensor] = None,
                text_padding_mask: Optional[Tensor] = None, image_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, causal_text: bool = False,
                kv_cache: Optional[KVCache] = None) -> BEiT3Output:
        """Encode images ``[B, C, H, W]`` and/or text ids ``[B, L]``.

        text_padding_mask: ``[B, L]`` bool, True at padding. image_mask: ``[B, P]`` bool, True
        where a patch is replaced by the mask token. attn_mask: dense ``[N, N]``/``[B, N, N]``,
        True = blocked. causal_text: the captioning mask (image tokens see image tokens; text
        tokens see all image tokens and leftward text), passed to attention in structured form.
        kv_cache: incremental decoding; once filled, a call with only the new ``text_ids``
        continues the fused sequence (its tokens take the text experts and see all cached keys).
        """
        if kv_cache is not None and kv_cache.length:
            return self._forward_incremental(text_ids, kv_cache)
        x, modality, split = self.embed(images, text_ids, image_mask)  # [B, N, D]
        key_padding_mask = None
        if text_padding_mask is not None and text_ids is not None:
            pad = text_padding_mask.bool()
            if modality is Modality.FUSED:
                pad = torch.cat([pad.new_zeros(x.shape[0], split), pad], dim=1)  # [B, N]
            key_padding_mask = pad if pad.any() else None
            x = x * (~pad).unsqueeze(-1).to(x.dtype)
        prefix_len = None
        if causal_text:
            if text_ids is None:
                raise ValueError("causal_text needs text_ids")
            prefix_len = split
        x = self.embed_dropout(x)
        if kv_cache is not None:
            if key_padding_mask is not None:
                raise ValueError("incremental decoding takes unpadded text")
            kv_cache.text_length = 0 if text_ids is None else text_ids.shape[1]
        for block in self.blocks:
            fn = functools.partial(block, modality=modality, split=split, key_padding_mask=key_padding_mask,
                                   prefix_len=prefix_len, attn_mask=attn_mask, kv_cache=kv_cache)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = self._checkpoint(fn, x)
            else:
                x = fn(x)
        if self.norm is not None:
            x = self.norm(x, modality, split)
        return BEiT3Output(hidden=x, split=split, modality=modality)

    def _forward_incremental(self, text_ids: Optional[Tensor], kv_cache: KVCache) -> BEiT3Output:
        """New text tokens ``[B, n]`` after a filled cache: fused-sequence text, causal among themselves."""
        if text_ids is None:
            raise ValueError("an incremental step takes the new text_ids")
        x, _, _ = self.embed(None, text_ids, None, text_start=kv_cache.text_length)  # [B, n, D]
        n, T = x.shape[1], kv_cache.length
        attn_mask = None
        if n > 1:  # new token i sees every cached key and new keys <= i
            attn_mask = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
            attn_mask = torch.cat([attn_mask.new_zeros(n, T), attn_mask], dim=1)  # [n, T + n]
        for block in self.blocks:
            x = block(x, Modality.FUSED, 0, attn_mask=attn_mask, kv_cache=kv_cache)
        kv_cache.text_length += n
        if self.norm is not None:
            x = self.norm(x, Modality.FUSED, 0)
        return BEiT3Output(hidden=x, split=0, modality=Modality.FUSED)

    def compile_blocks(self, **kwargs: Any) -> None:
        """``torch.compile`` every block in place (per-mode and packed paths); kwargs go to
        ``nn.Module.compile``. Blocks share code, so the recompile limit is raised to the depth."""
        import torch._dynamo

        limit = max(torch._dynamo.config.recompile_limit, 2 * len(self.blocks))
        torch._dynamo.config.recompile_limit = limit
        for block in self.blocks:
            block.compile(**kwargs)

    def _checkpoint(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if self._checkpoint_fn is not None:
            return self._checkpoint_fn(fn, x)
        return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)

    # ---- accounting ---------------------------------------------------------------------------
    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.text_embed.weight.numel()
        return n

    def flops_per_sample(self, num_image_tokens: int = 0, num_text_tokens: int = 0,
                         training: bool = True) -> float:
        """Matmul FLOPs of one sample (backbone only; training = 3x forward, no recompute).

        Pass ``num_image_tokens`` (CLS + patches, 0 for text-only) and ``num_text_tokens``.
        """
        cfg = self.config
        D, Fd, L = cfg.embed_dim, cfg.ffn_dim, cfg.depth
        N = num_image_tokens + num_text_tokens
        per_token_layer = 2 * (4 * D * D + 2 * D * Fd)
        attn = 2 * 2 * N * N * D  # QK^T and PV
        patch = 2 * cfg.num_patches * cfg.in_chans * cfg.patch_size ** 2 * D if num_image_tokens else 0
        fwd = L * (N * per_token_layer + attn) + patch
        return float(3 * fwd if training else fwd)

