"""Frozen teachers for tokenizer training, loaded from local state dicts (never downloaded)."""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError
from .config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from .vit import Mlp, PatchEmbed


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
        from ..beit3 import BEiT3
        from ..config import get_config
        backbone = BEiT3(get_config(beit3_preset))
        sub = {k[len("beit3."):]: v for k, v in state.items() if k.startswith("beit3.")} or dict(state)
        backbone.load_state_dict(sub, strict=True)
        return FrozenTeacher(BEiT3VisionTeacher(backbone), BEiT3VisionTeacher.mean, BEiT3VisionTeacher.std)
    raise ConfigError(f"teacher kind={kind!r}: choose one of {TEACHER_KINDS}")
