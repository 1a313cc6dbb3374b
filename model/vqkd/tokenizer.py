"""``VQKD``: encoder -> ``encode_task_layer`` (fp32) -> quantizer -> decoder -> ``decode_task_layer``
(to the teacher's feature width); ``codes(images)`` for targets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .config import VQKDConfig
from .vit import VisionTransformer
from .quantizer import NormEMAQuantizer


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
    """fp32 on every device: bf16 encoder codes agree with fp32 on fewer than 99.5% of the patches
    (CPU bf16 autocast: 97.8% for base with a random codebook, ``python -m bench.gpu_check
    --vqkd-codes base``; 99.3-99.5% for the trained-like tiny of ``tests/test_vqkd.py``), and a
    changed code is a changed target. bf16 stays available by passing ``dtype`` explicitly."""
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

        No grad; the encoder runs under autocast in ``dtype`` (default fp32, ``default_codes_dtype``;
        bf16 on request); the task layer and the codebook search run in fp32. Does not
        change the train/eval mode or the codebook.
        """
        dtype = dtype or default_codes_dtype(images.device)
        with torch.autocast(device_type=images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            z = self.encode(images)  # [B, P, code_dim] fp32
        return self.quantize.nearest(F.normalize(z, dim=-1))  # [B, P]
