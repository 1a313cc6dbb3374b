"""Tokenizer files: our format and the released BEiT v2 ``vqkd_encoder_base_decoder_*`` files."""
from __future__ import annotations

import math
import os
from typing import Any
from typing import Mapping

import torch
from torch import Tensor

from ..config import ConfigError
from ..safe_load import load_untrusted
from .config import OFFICIAL_DROPPED_PREFIXES, FORMAT_TAG, VQKDConfig
from .tokenizer import VQKD


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
