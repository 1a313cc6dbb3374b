"""Adapter between the official BEiT-3 checkpoints and our parameter names.

Official files (microsoft/unilm ``beit3``, built on torchscale) keep weights under
``checkpoint['model']``, the backbone under ``beit3.``, per-modality experts as ``A`` (vision)
and ``B`` (language) with separate q/k/v projections. Ours name experts ``vision`` /
``language`` and stack q/k/v in one ``qkv`` projection. Only the ``released`` layout has an
official counterpart. Heads outside the backbone (``mim_head``, ``mlm_head``, ``vision_head``,
``language_head``, fine-tuning heads) keep their names.

The vision position table (3 + patches rows: 2 fairseq offset rows and CLS, then the patch
grid) is interpolated bicubically when the resolution differs (the first 3 rows are kept).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import BEiT3Config, ConfigError
from .safe_load import read_tensors

PREFIX = "beit3."
_EXPERTS = {"vision": "A", "language": "B"}
_EXPERTS_BACK = {v: k for k, v in _EXPERTS.items()}
_POS_KEEP = 3  # rows 0-1 (fairseq offset) and 2 (CLS) are not part of the patch grid

# our per-layer name (after "blocks.{i}.") -> official name (after "encoder.layers.{i}.");
# "{e}" is the expert.
_LAYER_MAP = {
    "attn_norm.{e}": "self_attn_layer_norm.{e}",
    "attn.inner_norm.{e}": "self_attn.inner_attn_ln.{e}",
    "attn.proj.{e}": "self_attn.out_proj.{e}",
    "ffn.{e}.norm": "final_layer_norm.{e}",
    "ffn.{e}.fc1": "ffn.{e}.fc1",
    "ffn.{e}.fc2": "ffn.{e}.fc2",
    "ffn.{e}.inner_norm": "ffn.{e}.ffn_layernorm",
}
_TOP_MAP = {
    "text_embed": "text_embed",
    "vision_embed.proj": "vision_embed.proj",
    "vision_embed.cls_token": "vision_embed.cls_token",
    "vision_embed.mask_token": "vision_embed.mask_token",
    "vision_pos": "encoder.embed_positions.A",
    "text_pos": "encoder.embed_positions.B",
    "norm.{e}": "encoder.layer_norm.{e}",
}


def _name_pairs(depth: int) -> list[tuple[str, str]]:
    """(our module path, official module path) for every mapped module of the backbone."""
    pairs = []
    for ours, theirs in _TOP_MAP.items():
        if "{e}" in ours:
            pairs += [(ours.format(e=e), theirs.format(e=a)) for e, a in _EXPERTS.items()]
        else:
            pairs.append((ours, theirs))
    for i in range(depth):
        for ours, theirs in _LAYER_MAP.items():
            for e, a in _EXPERTS.items():
                pairs.append((f"blocks.{i}.{ours.format(e=e)}", f"encoder.layers.{i}.{theirs.format(e=a)}"))
    return pairs


def _require_released(cfg: BEiT3Config) -> None:
    if cfg.layout != "released":
        raise ConfigError(f"BEiT3Config.layout={cfg.layout!r}: only the 'released' layout has an official "
                          "checkpoint counterpart")


def interpolate_vision_pos(weight: Tensor, num_patches: int) -> Tensor:
    """Resize a vision position table ``[3 + P_old, D]`` to ``[3 + num_patches, D]`` (bicubic)."""
    old = weight.shape[0] - _POS_KEEP
    if old == num_patches:
        return weight
    g_old, g_new = math.isqrt(old), math.isqrt(num_patches)
    if g_old * g_old != old or g_new * g_new != num_patches:
        raise ValueError(f"position table of {old} patches -> {num_patches}: grids must be square")
    head, grid = weight[:_POS_KEEP], weight[_POS_KEEP:]
    D = weight.shape[1]
    grid = grid.float().reshape(1, g_old, g_old, D).permute(0, 3, 1, 2)  # [1, D, g, g]
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(g_new * g_new, D).to(weight.dtype)
    return torch.cat([head, grid], dim=0)


def adapt_resolution(state_dict: dict[str, Tensor], cfg: BEiT3Config, prefix: str = PREFIX) -> dict[str, Tensor]:
    """Interpolate our ``{prefix}vision_pos.weight`` to ``cfg``'s patch grid (in place, returned)."""
    key = f"{prefix}vision_pos.weight"
    if key in state_dict:
        state_dict[key] = interpolate_vision_pos(state_dict[key], cfg.num_patches)
    return state_dict


def official_to_ours(state_dict: Mapping[str, Tensor], cfg: BEiT3Config) -> dict[str, Tensor]:
    """Official keys (``beit3.encoder.layers.0.self_attn.q_proj.A.weight`` ...) -> ours
    (``beit3.blocks.0.attn.qkv.vision.weight`` ...); heads pass through unchanged."""
    _require_released(cfg)
    src = dict(state_dict)
    out: dict[str, Tensor] = {}
    for ours, theirs in _name_pairs(cfg.depth):
        for leaf in ("weight", "bias", ""):
            key = f"{PREFIX}{theirs}.{leaf}" if leaf else f"{PREFIX}{theirs}"
            if key in src:
                out[f"{PREFIX}{ours}.{leaf}" if leaf else f"{PREFIX}{ours}"] = src.pop(key)
    for i in range(cfg.depth):
        for e, a in _EXPERTS.items():
            for leaf in ("weight", "bias"):
                keys = [f"{PREFIX}encoder.layers.{i}.self_attn.{p}_proj.{a}.{leaf}" for p in "qkv"]
                missing = [k for k in keys if k not in src]
                if missing:
                    raise KeyError(f"official checkpoint lacks {missing[0]}")
                out[f"{PREFIX}blocks.{i}.attn.qkv.{e}.{leaf}"] = torch.cat([src.pop(k) for k in keys], dim=0)
    leftover = [k for k in src if k.startswith(PREFIX)]
    if leftover:
        raise KeyError(f"official backbone keys not understood (layout or depth mismatch?): {leftover[:5]}")
    out.update(src)  # heads and anything outside the backbone
    return adapt_resolution(out, cfg)


def ours_to_official(state_dict: Mapping[str, Tensor], cfg: BEiT3Config) -> dict[str, Tensor]:
    """Inverse of ``official_to_ours``: the layout the official fine-tuning code loads."""
    _require_released(cfg)
    src = dict(state_dict)
    out: dict[str, Tensor] = {}
    for i in range(cfg.depth):
        for e, a in _EXPERTS.items():
            for leaf in ("weight", "bias"):
                qkv = src.pop(f"{PREFIX}blocks.{i}.attn.qkv.{e}.{leaf}")
                for p, t in zip("qkv", qkv.chunk(3, dim=0)):
                    out[f"{PREFIX}encoder.layers.{i}.self_attn.{p}_proj.{a}.{leaf}"] = t.clone()
    for ours, theirs in _name_pairs(cfg.depth):
        for leaf in ("weight", "bias", ""):
            key = f"{PREFIX}{ours}.{leaf}" if leaf else f"{PREFIX}{ours}"
            if key in src:
                out[f"{PREFIX}{theirs}.{leaf}" if leaf else f"{PREFIX}{theirs}"] = src.pop(key)
    leftover = [k for k in src if k.startswith(PREFIX)]
    if leftover:
        raise KeyError(f"backbone keys without an official name: {leftover[:5]}")
    out.update(src)
    return out


def is_official(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(f"{PREFIX}encoder.layers.") for k in state_dict)


def read_checkpoint(path: Union[str, Path]) -> dict[str, Tensor]:
    """Tensors of a ``.pth`` (``model``/``module`` entry or flat) or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    ckpt = read_tensors(path)  # safetensors, or weights_only=True: a pickle with code is refused
    for key in ("model", "module", "state_dict"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


def load_pretrained(path_or_state: Union[str, Path, Mapping[str, Tensor]], cfg: BEiT3Config) -> dict[str, Tensor]:
    """An official checkpoint or our own export, as our names with ``beit3.`` prefixed backbone,
    position table interpolated to ``cfg``."""
    sd = dict(path_or_state) if isinstance(path_or_state, Mapping) else read_checkpoint(path_or_state)
    if is_official(sd):
        return official_to_ours(sd, cfg)
    if not any(k.startswith(PREFIX) for k in sd):  # a bare backbone state dict
        sd = {f"{PREFIX}{k}": v for k, v in sd.items()}
    return adapt_resolution(sd, cfg)


def backbone_state(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The ``beit3.``-prefixed entries with the prefix removed (for a bare ``BEiT3``)."""
    return {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}


_HEADS = {768: 12, 1024: 16, 1408: 16}


def infer_config(state_dict: Mapping[str, Tensor], num_heads: Optional[int] = None, **overrides) -> BEiT3Config:
    """A released-layout config read off an official state dict (heads from width if not given)."""
    sd = state_dict
    D = sd[f"{PREFIX}text_embed.weight"].shape[1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"beit3\.encoder\.layers\.(\d+)\.", k)))
    patch = sd[f"{PREFIX}vision_embed.proj.weight"].shape[-1]
    grid = math.isqrt(sd[f"{PREFIX}encoder.embed_positions.A.weight"].shape[0] - _POS_KEEP)
    if num_heads is None and D not in _HEADS:
        raise ConfigError(f"num_heads: cannot infer for width {D}; pass it")
    cfg = dict(layout="released", embed_dim=D, depth=depth, num_heads=num_heads or _HEADS[D],
               ffn_dim=sd[f"{PREFIX}encoder.layers.0.ffn.A.fc1.weight"].shape[0], patch_size=patch,
               img_size=grid * patch, vocab_size=sd[f"{PREFIX}text_embed.weight"].shape[0],
               max_text_positions=sd[f"{PREFIX}encoder.embed_positions.B.weight"].shape[0],
               in_chans=sd[f"{PREFIX}vision_embed.proj.weight"].shape[1])
    cfg.update(overrides)
    return BEiT3Config.from_dict(cfg)


__all__ = ["official_to_ours", "ours_to_official", "interpolate_vision_pos", "adapt_resolution",
           "load_pretrained", "read_checkpoint", "backbone_state", "infer_config", "is_official", "PREFIX"]
