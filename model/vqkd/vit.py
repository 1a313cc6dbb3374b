"""The released tokenizer's ViT (q and v biases, no k bias, LayerNorm eps 1e-6, absolute positions,
patch tokens through ``fc_norm``); the encoder (image -> patch features) and the decoder (code map,
patch size 1 -> patch features)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


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
