"""Packed, padding-free Multiway forward of a pretraining micro-batch (images, texts, pairs) in one pass.

All real tokens of the micro-batch are concatenated into one ``[T, D]`` stream, ordered

    [ image tokens | pair image tokens | pair text tokens | text tokens ]

so that each Multiway expert owns a contiguous slice: the vision expert takes the image tokens
and the image part of the pairs, the language expert the caption part of the pairs and the
texts; where a module has a vision-language expert (paper layout, top ``num_vl_layers`` FFNs)
it takes the whole pair slice. Every expert is called once per layer, on every call, also on a
zero-size slice when a source is empty, so ZeRO-3 sees the same modules in the same order on
every rank. Token-wise work (embeddings, projections, LayerNorms, FFNs, heads at the masked
positions only) never sees a padding token. Attention runs per sequence group with the
dispatch of ``model/attention.py``: images ``[B_i, 1+P]``, pairs ``[B_p, 1+P+L_p]`` and texts
``[B_t, L_t]``, captions padded (to the longest one of their group) only inside attention
with a key-padding mask; no mask over the packed stream is ever built.

The per-mode ``BEiT3.forward`` stays as it is (fine-tuning, evaluation); this module only
reads the modules of a ``BEiT3ForPretraining``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .attention import attention
from .beit3 import POSITION_OFFSET, Multiway, MultiwayAttention, MultiwayBlock

if TYPE_CHECKING:  # heads imports this module lazily
    from .config import BEiT3Config
    from .heads import BEiT3ForPretraining

SOURCES = ("image", "text", "pair")


@dataclass
class SourceBatch:
    """One source of a micro-batch, as the loader gives it (missing fields: that part is absent).

    images ``[B, C, H, W]``; image_mask ``[B, P]`` bool, True = masked and predicted;
    text_ids ``[B, L]``; padding_mask ``[B, L]`` bool, True = padding; text_mask ``[B, L]`` bool,
    True = predicted (never at padding).
    """

    images: Optional[Tensor] = None
    image_mask: Optional[Tensor] = None
    text_ids: Optional[Tensor] = None
    padding_mask: Optional[Tensor] = None
    text_mask: Optional[Tensor] = None


@dataclass
class TextLayout:
    """Where the real tokens of a text group sit in its padded attention layout ``[rows, length]``."""

    rows: int
    length: int
    index: Tensor  # [n] row-major flat positions of the real tokens in [rows * length]
    key_padding: Optional[Tensor]  # [rows, length] True = padding, None when there is none
    ids: Tensor  # [n] token ids
    positions: Tensor  # [n] position ids (column + 2, as the per-mode forward)
    predict: Tensor  # [n] bool, True = MLM target

    @property
    def num_tokens(self) -> int:
        return int(self.index.numel())

    def to(self, device: torch.device) -> "TextLayout":
        """The layout's index tensors on ``device`` (a non-blocking copy of host-built indices)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TextLayout(self.rows, self.length, move(self.index), move(self.key_padding), move(self.ids),
                          move(self.positions), move(self.predict))


def text_layout(text_ids: Optional[Tensor], padding_mask: Optional[Tensor], text_mask: Optional[Tensor],
                drop_empty_rows: bool, device: torch.device) -> TextLayout:
    """Real tokens of ``[B, L]`` texts; rows without a real token are dropped when ``drop_empty_rows``
    and the padded length is cut to the last real column."""
    if text_ids is None:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return TextLayout(0, 0, empty, None, empty, empty, empty.bool())
    real = torch.ones(text_ids.shape, dtype=torch.bool, device=device) if padding_mask is None else ~padding_mask.bool()
    predict = torch.zeros_like(real) if text_mask is None else text_mask.bool()
    if bool((predict & ~real).any()):
        raise ValueError("text_mask selects padding positions (padding_mask True); mask only real tokens")
    if drop_empty_rows:
        rows = real.any(1).nonzero().squeeze(1)
        real, predict, text_ids = real[rows], predict[rows], text_ids[rows]
    cols = real.any(0).nonzero()
    length = int(cols[-1]) + 1 if cols.numel() else 0
    real, predict, text_ids = real[:, :length], predict[:, :length], text_ids[:, :length]
    index = real.flatten().nonzero().squeeze(1)  # [n]
    key_padding = ~real if not bool(real.all()) else None
    positions = index % max(length, 1) + POSITION_OFFSET
    return TextLayout(rows=int(real.shape[0]), length=length, index=index, key_padding=key_padding,
                      ids=text_ids.flatten()[index], positions=positions, predict=predict.flatten()[index])


@dataclass
class PackedLayout:
    """Token counts and index maps of one packed micro-batch (built once, used by every layer)."""

    num_images: int  # B_i
    num_pairs: int  # B_p
    seq: int  # 1 + P tokens per image
    pair_text: TextLayout
    text: TextLayout
    mim_index: Optional[Tensor] = None  # [M_img] vision-stream rows of the masked patches (images, then pairs)
    mlm_index: Optional[Tensor] = None  # [M_txt] packed rows of the masked text tokens (pairs, then texts)
    mim_counts: Optional[dict[str, int]] = None  # masked patches of {"image", "pair"}
    mlm_counts: Optional[dict[str, int]] = None  # masked text tokens of {"pair", "text"}
    sample_of_token: Optional[Tensor] = None  # [T], filled lazily for drop path

    def to(self, device: torch.device) -> "PackedLayout":
        """This layout with its index tensors on ``device``: built on the host from the loader's CPU
        masks, it is copied once, without a wait (``plan_layout``)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return PackedLayout(self.num_images, self.num_pairs, self.seq, self.pair_text.to(device),
                            self.text.to(device), move(self.mim_index), move(self.mlm_index),
                            self.mim_counts, self.mlm_counts)

    @property
    def image_end(self) -> int:  # end of the image tokens
        return self.num_images * self.seq

    @property
    def vision_end(self) -> int:  # end of the pair image tokens: the vision expert's slice
        return (self.num_images + self.num_pairs) * self.seq

    @property
    def pair_end(self) -> int:  # end of the pair text tokens
        return self.vision_end + self.pair_text.num_tokens

    @property
    def num_tokens(self) -> int:
        return self.pair_end + self.text.num_tokens

    def samples(self, device: torch.device) -> tuple[int, Tensor]:
        """Number of samples and the sample index of every token ``[T]`` (images, pairs, texts)."""
        if self.sample_of_token is None:
            n_vis = self.num_images + self.num_pairs
            vis = torch.arange(n_vis, device=device).repeat_interleave(self.seq)
            pair_txt = self.num_images + torch.div(self.pair_text.index, max(self.pair_text.length, 1),
                                                   rounding_mode="floor")
            txt = n_vis + torch.div(self.text.index, max(self.text.length, 1), rounding_mode="floor")
            self.sample_of_token = torch.cat([vis, pair_txt, txt])
        return self.num_images + self.num_pairs + self.text.rows, self.sample_of_token

    def run_block(self, block: MultiwayBlock, x: Tensor) -> Tensor:
        """``block(x, packed=layout)`` lands here: the block over this packed stream ``[T, D]``."""
        return packed_block(block, x, self)


def route(module: nn.Module, x: Tensor, lay: PackedLayout) -> Tensor:
    """A Multiway module on the packed stream ``[T, ...]``: each expert once on its contiguous slice."""
    if not isinstance(module, Multiway):
        return module(x)
    if module.vision_language is not None:
        a, b = lay.image_end, lay.pair_end
        return torch.cat([module.vision(x[:a]), module.vision_language(x[a:b]), module.language(x[b:])])
    s = lay.vision_end
    return torch.cat([module.vision(x[:s]), module.language(x[s:])])


def _attend(qkv: Tensor, heads: int, key_padding: Optional[Tensor], dropout_p: float, backend: str) -> Tensor:
    """Self-attention of one sequence group ``[B, N, 3D]`` -> ``[B, N, D]``."""
    B, N, D3 = qkv.shape
    D = D3 // 3
    q, k, v = qkv.view(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # each [B, H, N, Dh]
    o = attention(q, k, v, key_padding_mask=key_padding, dropout_p=dropout_p, backend=backend)
    return o.transpose(1, 2).reshape(B, N, D)


def _scatter(tokens: Tensor, t: TextLayout) -> Tensor:
    """Real tokens ``[n, C]`` into their padded layout ``[rows, length, C]`` (zeros at padding)."""
    out = tokens.new_zeros(t.rows * t.length, tokens.shape[-1]).index_copy(0, t.index, tokens)
    return out.view(t.rows, t.length, tokens.shape[-1])


def grouped_attention(qkv: Tensor, lay: PackedLayout, heads: int, dropout_p: float, backend: str) -> Tensor:
    """Attention of the packed stream ``[T, 3D]`` per sequence group -> ``[T, D]``."""
    D = qkv.shape[-1] // 3
    S, out = lay.seq, []
    if lay.num_images:  # images [B_i, S]: no mask
        out.append(_attend(qkv[:lay.image_end].view(lay.num_images, S, 3 * D), heads, None, dropout_p,
                           backend).reshape(-1, D))
    if lay.num_pairs:  # pairs [B_p, S + L_p]: captions padded inside attention only
        pt = lay.pair_text
        seq = torch.cat([qkv[lay.image_end:lay.vision_end].view(lay.num_pairs, S, 3 * D),
                         _scatter(qkv[lay.vision_end:lay.pair_end], pt)], dim=1)
        pad = None
        if pt.key_padding is not None:
            pad = torch.cat([pt.key_padding.new_zeros(lay.num_pairs, S), pt.key_padding], dim=1)
        o = _attend(seq, heads, pad, dropout_p, backend)  # [B_p, S + L_p, D]
        out.append(o[:, :S].reshape(-1, D))
        out.append(o[:, S:].reshape(-1, D).index_select(0, pt.index))
    if lay.text.rows:  # texts [B_t, L_t]
        t = lay.text
        o = _attend(_scatter(qkv[lay.pair_end:], t), heads, t.key_padding, dropout_p, backend)
        out.append(o.reshape(-1, D).index_select(0, t.index))
    return torch.cat(out) if out else qkv.new_zeros(0, D)


def packed_attention(attn: MultiwayAttention, x: Tensor, lay: PackedLayout) -> Tensor:
    """``MultiwayAttention`` on the packed stream ``[T, D]`` -> ``[T, D]``."""
    qkv = route(attn.qkv, x, lay)  # [T, 3D]
    o = grouped_attention(qkv, lay, attn.num_heads, attn.attn_dropout if attn.training else 0.0, attn.backend)
    o = route(attn.inner_norm, o, lay)
    return route(attn.proj, o, lay)  # [T, D]


def _drop_path(x: Tensor, rate: float, training: bool, lay: PackedLayout) -> Tensor:
    """Stochastic depth per sample on the packed stream: one keep draw per sample."""
    if rate == 0.0 or not training:
        return x
    n, sample = lay.samples(x.device)
    keep = 1.0 - rate
    mask = x.new_empty(n).bernoulli_(keep)[sample].unsqueeze(-1)  # [T, 1]
    return x * mask / keep


def packed_block(block: MultiwayBlock, x: Tensor, lay: PackedLayout) -> Tensor:
    """One ``MultiwayBlock`` on the packed stream ``[T, D]`` -> ``[T, D]``."""
    h = route(block.attn_norm, x, lay)
    h = packed_attention(block.attn, h, lay)
    x = x + _drop_path(block.dropout(h), block.drop_path_rate, block.training, lay)
    h = route(block.ffn, x, lay)
    return x + _drop_path(h, block.drop_path_rate, block.training, lay)  # [T, D]


@dataclass
class PackedMDMOutput:
    """Hidden stream ``[T, D]``, its layout and the logits at the masked positions of each source.

    ``mim_logits`` holds image then pair rows (``mim_counts``), ``mlm_logits`` pair then text
    rows (``mlm_counts``), each in the row-major order of the source's mask, as the per-mode forward.
    """

    hidden: Tensor
    layout: PackedLayout
    mim_logits: Tensor
    mlm_logits: Tensor
    mim_counts: dict[str, int]
    mlm_counts: dict[str, int]

    def mim(self, source: str) -> Tensor:
        n = self.mim_counts
        return self.mim_logits[:n["image"]] if source == "image" else self.mim_logits[n["image"]:]

    def mlm(self, source: str) -> Tensor:
        n = self.mlm_counts
        return self.mlm_logits[:n["pair"]] if source == "pair" else self.mlm_logits[n["pair"]:]


def _vision_masks(cfg: "BEiT3Config", image: SourceBatch, pair: SourceBatch, device: torch.device) -> Tensor:
    """Patch masks of both sources ``[B_i + B_p, P]`` (no mask: nothing predicted)."""
    masks = [(src.image_mask.bool() if src.image_mask is not None
              else torch.zeros(len(src.images), cfg.num_patches, dtype=torch.bool, device=device))
             for src in (image, pair) if src.images is not None]
    return torch.cat(masks) if masks else torch.zeros(0, cfg.num_patches, dtype=torch.bool, device=device)


def _vision_inputs(model: "BEiT3ForPretraining", image: SourceBatch, pair: SourceBatch,
                   device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Images of both sources ``[B_i + B_p, C, H, W]`` and their patch masks ``[B_i + B_p, P]``."""
    cfg = model.config
    ims = [src.images for src in (image, pair) if src.images is not None]
    if not ims:
        ims = [torch.zeros(0, cfg.in_chans, cfg.img_size, cfg.img_size, device=device, dtype=dtype)]
    return torch.cat(ims), _vision_masks(cfg, image, pair, device)


def _device_of(*sources: SourceBatch) -> torch.device:
    given = [t for s in sources for t in (s.images, s.text_ids) if t is not None]
    if not given:
        raise ValueError("packed_forward needs at least one source with images or text_ids")
    return given[0].device


def plan_layout(cfg: "BEiT3Config", image: Optional[SourceBatch] = None, text: Optional[SourceBatch] = None,
                pair: Optional[SourceBatch] = None) -> PackedLayout:
    """The packed layout of a micro-batch from its masks and ids alone (images are only counted).

    Built from the loader's CPU tensors before the host-to-device copy, every value-dependent
    step (``nonzero``, lengths, counts) runs on the host, and ``layout.to(device)`` moves the
    indices without the device ever being waited for. On device tensors it gives the same layout.
    """
    image, text, pair = image or SourceBatch(), text or SourceBatch(), pair or SourceBatch()
    device = _device_of(image, text, pair)
    vmask = _vision_masks(cfg, image, pair, device)
    if vmask.shape[1] != cfg.num_patches:
        raise ValueError(f"image_mask has {vmask.shape[1]} patches, the model {cfg.num_patches}")
    lay = PackedLayout(num_images=0 if image.images is None else len(image.images),
                       num_pairs=0 if pair.images is None else len(pair.images), seq=cfg.num_vision_tokens,
                       pair_text=text_layout(pair.text_ids, pair.padding_mask, pair.text_mask, False, device),
                       text=text_layout(text.text_ids, text.padding_mask, text.text_mask, True, device))
    if pair.text_ids is not None and lay.pair_text.rows != lay.num_pairs:
        raise ValueError(f"pair source has {lay.num_pairs} images but {lay.pair_text.rows} captions")
    tpos = torch.cat([lay.pair_text.positions, lay.text.positions])
    if tpos.numel() and int(tpos.max()) >= cfg.max_text_positions:
        raise ValueError(f"text length {int(tpos.max()) - 1} exceeds max_text_positions - 2 = "
                         f"{cfg.max_text_positions - POSITION_OFFSET}")
    lay.mim_index = torch.cat([vmask.new_zeros(len(vmask), 1), vmask], dim=1).flatten().nonzero().squeeze(1)
    lay.mlm_index = torch.cat([lay.pair_text.predict, lay.text.predict]).nonzero().squeeze(1) + lay.vision_end
    n_img, n_pair = int(vmask[:lay.num_images].sum()), int(lay.pair_text.predict.sum())
    lay.mim_counts = {"image": n_img, "pair": int(lay.mim_index.numel()) - n_img}
    lay.mlm_counts = {"pair": n_pair, "text": int(lay.mlm_index.numel()) - n_pair}
    return lay


def packed_forward(model: "BEiT3ForPretraining", image: Optional[SourceBatch] = None,
                   text: Optional[SourceBatch] = None, pair: Optional[SourceBatch] = None,
                   layout: Optional[PackedLayout] = None) -> PackedMDMOutput:
    """Backbone and MDM heads over the micro-batch's sources in one pass (see the module docstring).

    A missing source is an empty one: every module still runs (on zero tokens). ``layout``: the
    micro-batch's ``plan_layout`` already on the device (the training step builds it on the host);
    without it the layout is planned here, from the given tensors.
    """
    image, text, pair = image or SourceBatch(), text or SourceBatch(), pair or SourceBatch()
    if image.text_ids is not None or text.images is not None:
        raise ValueError("the image source takes no text_ids and the text source no images (pairs hold both)")
    net = model.beit3
    dtype = net.vision_embed.proj.weight.dtype
    device = _device_of(image, text, pair)
    lay = layout if layout is not None else plan_layout(model.config, image, text, pair)
    images, vmask = _vision_inputs(model, image, pair, device, dtype)

    # embeddings: [n_vis * S, D] then [n_txt, D]
    xv = net.vision_embed(images, vmask)  # [B_i + B_p, S, D]
    pos = torch.arange(POSITION_OFFSET, lay.seq + POSITION_OFFSET, device=device)
    xv = (xv + net.vision_pos(pos).to(xv.dtype)).reshape(-1, xv.shape[-1])
    xt = net.text_embed(torch.cat([lay.pair_text.ids, lay.text.ids]))  # [n_txt, D]
    xt = xt + net.text_pos(torch.cat([lay.pair_text.positions, lay.text.positions])).to(xt.dtype)
    x = net.embed_dropout(torch.cat([xv, xt.to(xv.dtype)]))  # [T, D]

    for block in net.blocks:
        if net.grad_checkpointing and net.training and torch.is_grad_enabled():
            x = net._checkpoint(lambda h, b=block: b(h, packed=lay), x)
        else:
            x = block(x, packed=lay)
    if net.norm is not None:
        x = route(net.norm, x, lay)

    # heads at the masked positions only
    mim_logits = model.mim_head(x.index_select(0, lay.mim_index))  # [M_img, V_img]
    mlm_logits = model.mlm_head(x.index_select(0, lay.mlm_index))  # [M_txt, V_txt]
    return PackedMDMOutput(hidden=x, layout=lay, mim_logits=mim_logits, mlm_logits=mlm_logits,
                           mim_counts=lay.mim_counts, mlm_counts=lay.mlm_counts)


__all__ = ["SourceBatch", "PackedLayout", "TextLayout", "PackedMDMOutput", "packed_forward", "plan_layout", "packed_block",
           "packed_attention", "grouped_attention", "route", "text_layout", "SOURCES"]
