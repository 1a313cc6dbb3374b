"""Random pretraining micro-batches of the loader's layout (offline codes, right-padded texts) for
tests and benches of the packed step."""
from __future__ import annotations

import torch


def random_micro_batch(cfg, B: int = 3, L: int = 12, sources=("image", "text", "pair"), seed: int = 0) -> dict:
    """Random sources with right-padded texts of lengths 3..L (row 0 full length)."""
    g = torch.Generator().manual_seed(seed)
    P = cfg.num_patches

    def src(kind):
        d = {}
        if kind != "text":
            d["images"] = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g)
            d["image_mask"] = torch.rand(B, P, generator=g) < 0.4
            d["codes"] = torch.randint(0, cfg.num_visual_tokens, (B, P), generator=g)
        if kind != "image":
            lens = torch.randint(3, L + 1, (B,), generator=g)
            lens[0] = L
            pad = torch.arange(L)[None] >= lens[:, None]
            d["text_ids"] = torch.randint(4, cfg.vocab_size, (B, L), generator=g).masked_fill(pad, 1)
            d["text_labels"] = d["text_ids"].clone()
            d["text_mask"] = (torch.rand(B, L, generator=g) < 0.3) & ~pad
            d["text_mask"][:, 1] = True
            d["padding_mask"] = pad
        return d

    return {s: src(s) for s in sources}


__all__ = ["random_micro_batch"]
