"""Heads on top of the backbone: masked data modeling (MLM + MIM) and contrastive retrieval."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .beit3 import BEiT3, BEiT3Output
from .config import BEiT3Config
from .packed import PackedLayout, PackedMDMOutput, SourceBatch, packed_forward


@dataclass
class MDMOutput:
    """Logits at the masked positions only: ``mlm [M_text, vocab]``, ``mim [M_img, visual vocab]``."""

    backbone: BEiT3Output
    mlm_logits: Optional[Tensor]
    mim_logits: Optional[Tensor]


class BEiT3ForPretraining(nn.Module):
    """Backbone + MLM head (text vocabulary) + MIM head (visual-token ids)."""

    def __init__(self, cfg: BEiT3Config) -> None:
        super().__init__()
        self.config = cfg
        self.beit3 = BEiT3(cfg)
        self.mlm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size)
        self.mim_head = nn.Linear(cfg.embed_dim, cfg.num_visual_tokens)
        for head in (self.mlm_head, self.mim_head):
            nn.init.trunc_normal_(head.weight, std=cfg.init_std, a=-cfg.init_std, b=cfg.init_std)
            nn.init.zeros_(head.bias)

    def no_weight_decay(self) -> set[str]:
        return {f"beit3.{n}" for n in self.beit3.no_weight_decay()}

    def set_grad_checkpointing(self, enable: bool = True, checkpoint_fn=None) -> None:
        self.beit3.set_grad_checkpointing(enable, checkpoint_fn)

    def forward(self, images: Optional[Tensor] = None, text_ids: Optional[Tensor] = None,
                text_padding_mask: Optional[Tensor] = None, image_mask: Optional[Tensor] = None,
                text_mask: Optional[Tensor] = None,
                sources: Optional[dict[str, SourceBatch]] = None,
                layout: Optional[PackedLayout] = None) -> Union[MDMOutput, PackedMDMOutput]:
        """image_mask ``[B, P]`` / text_mask ``[B, L]``: bool, True where a label is predicted.

        ``sources`` (``{"image"|"text"|"pair": SourceBatch}``) instead: the whole micro-batch in one
        packed, padding-free pass (``model.packed.packed_forward``; ``layout``: its host-planned
        ``plan_layout`` on the device); the other arguments must be unset.
        """
        if sources is not None:
            if any(t is not None for t in (images, text_ids, text_padding_mask, image_mask, text_mask)):
                raise ValueError("pass either sources (packed) or per-mode tensors, not both")
            unknown = sorted(set(sources) - {"image", "text", "pair"})
            if unknown:
                raise ValueError(f"unknown source(s) {unknown}; expected 'image', 'text', 'pair'")
            return packed_forward(self, **sources, layout=layout)
        out = self.beit3(images=images, text_ids=text_ids, text_padding_mask=text_padding_mask,
                         image_mask=image_mask)
        mim = mlm = None
        if images is not None and image_mask is not None:
            patches = out.vision[:, 1:]  # [B, P, D] (CLS dropped)
            mim = self.mim_head(patches[image_mask.bool()])  # [M_img, V_img]
        if text_ids is not None and text_mask is not None:
            mlm = self.mlm_head(out.text[text_mask.bool()])  # [M_text, V_text]
        return MDMOutput(backbone=out, mlm_logits=mlm, mim_logits=mim)

    def flops_per_sample(self, num_image_tokens: int = 0, num_text_tokens: int = 0,
                         num_masked_patches: int = 0, num_masked_text: int = 0,
                         training: bool = True) -> float:
        cfg = self.config
        head = 2 * cfg.embed_dim * (num_masked_patches * cfg.num_visual_tokens + num_masked_text * cfg.vocab_size)
        total = self.beit3.flops_per_sample(num_image_tokens, num_text_tokens, training=False) + head
        return float(3 * total if training else total)


class ContrastiveHeads(nn.Module):
    """``vision_head`` / ``language_head`` (D x D, no bias) on the first token, L2-normalized,
    with a learnable temperature initialised to 1/0.07 (CLIP)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.vision_head = nn.Linear(embed_dim, embed_dim, bias=False)
        self.language_head = nn.Linear(embed_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_vision(self, out: BEiT3Output) -> Tensor:
        return F.normalize(self.vision_head(out.hidden[:, 0]), dim=-1)  # [B, D]

    def encode_text(self, out: BEiT3Output) -> Tensor:
        return F.normalize(self.language_head(out.hidden[:, 0]), dim=-1)  # [B, D]
