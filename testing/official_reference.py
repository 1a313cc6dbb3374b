"""The official implementation (microsoft/torchscale ``BEiT3``) as a reference for parity checks.

Used by tests/test_convert.py and bench/parity.py; torchscale is a test dependency only.
"""
from __future__ import annotations

import torch

from beit3.model import BEiT3, BEiT3Config
from beit3.model.convert import backbone_state, official_to_ours


def build_official(cfg: BEiT3Config) -> torch.nn.Module:
    from torchscale.architecture.config import EncoderConfig
    from torchscale.model.BEiT3 import BEiT3 as OfficialBEiT3

    args = EncoderConfig(
        img_size=cfg.img_size, patch_size=cfg.patch_size, vocab_size=cfg.vocab_size, multiway=True,
        layernorm_embedding=False, normalize_output=cfg.normalize_output, no_output_layer=True,
        drop_path_rate=0.0, encoder_embed_dim=cfg.embed_dim, encoder_attention_heads=cfg.num_heads,
        encoder_ffn_embed_dim=cfg.ffn_dim, encoder_layers=cfg.depth, max_source_positions=cfg.max_text_positions,
        layernorm_eps=cfg.layer_norm_eps)
    return OfficialBEiT3(args)


def official_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as the official checkpoints store it (``beit3.`` prefix)."""
    return {f"beit3.{k}": v for k, v in model.state_dict().items()}


def paired_models(cfg: BEiT3Config, seed: int = 0) -> tuple[torch.nn.Module, BEiT3]:
    """The official model with perturbed (non-trivial) weights, and ours loaded from its checkpoint."""
    torch.manual_seed(seed)
    official = build_official(cfg).eval()
    with torch.no_grad():  # LayerNorms start at 1/0: perturb everything so each weight matters
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = BEiT3(cfg).eval()
    ours.load_state_dict(backbone_state(official_to_ours(official_state(official), cfg)))
    return official, ours


def parity(cfg: BEiT3Config, batch: int = 2, text_len: int = 16, seed: int = 0) -> dict[str, float]:
    """Max abs difference of the outputs, ours vs official, per mode (padding included)."""
    official, ours = paired_models(cfg, seed)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    text = torch.randint(4, cfg.vocab_size, (batch, text_len), generator=g)
    pad = torch.zeros(batch, text_len, dtype=torch.bool)
    pad[-1, text_len // 2:] = True
    S, N = cfg.num_vision_tokens, cfg.num_vision_tokens + text_len
    caption = torch.zeros(N, N, dtype=torch.bool)
    caption[:S, S:] = True
    caption[S:, S:] = torch.ones(text_len, text_len, dtype=torch.bool).triu(1)
    keep = torch.cat([torch.ones(batch, S, dtype=torch.bool), ~pad], dim=1)
    out = {}
    with torch.no_grad():
        o = official(visual_tokens=images)["encoder_out"]
        out["vision"] = (o - ours(images=images).hidden).abs().max().item()
        o = official(textual_tokens=text, text_padding_position=pad)["encoder_out"]
        out["text+padding"] = (o - ours(text_ids=text, text_padding_mask=pad).hidden)[~pad].abs().max().item()
        o = official(visual_tokens=images, textual_tokens=text, text_padding_position=pad)["encoder_out"]
        m = ours(images=images, text_ids=text, text_padding_mask=pad).hidden
        out["fused+padding"] = (o - m)[keep].abs().max().item()
        o = official(visual_tokens=images, textual_tokens=text, attn_mask=caption.float())["encoder_out"]
        out["fused+captioning"] = (o - ours(images=images, text_ids=text, causal_text=True).hidden).abs().max().item()
        out["output_scale"] = m.abs().max().item()
    return out
