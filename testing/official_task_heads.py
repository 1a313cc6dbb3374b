"""The official fine-tuning heads (unilm ``beit3/modeling_finetune.py``) written out: the tensor
names and shapes of each task checkpoint, a random-weight file in exactly that layout, and the
task output computed directly from the file's tensors on top of torchscale's ``BEiT3``.

Used by tests/test_finetune_official.py, tests/test_finetune_recipe_runs.py and
bench/task_parity.py; torchscale is a test dependency only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from beit3.model import BEiT3Config
from beit3.testing.official_reference import build_official, official_state

EPS = 1e-5  # nn.LayerNorm's default, as the official heads build their norms


def head_layout(task: str, D: int, num_labels: int = 0, vocab: int = 0) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the head tensors of an official task checkpoint (outside ``beit3.``)."""
    if task == "classification":  # BEiT3ForImageClassification
        return {"fc_norm.weight": (D,), "fc_norm.bias": (D,), "head.weight": (num_labels, D),
                "head.bias": (num_labels,)}
    if task == "vqa":  # BEiT3ForVisualQuestionAnswering: Pooler + Sequential(Linear, LN, GELU, Linear)
        return {"pooler.norm.weight": (D,), "pooler.norm.bias": (D,), "pooler.dense.weight": (D, D),
                "pooler.dense.bias": (D,), "head.0.weight": (2 * D, D), "head.0.bias": (2 * D,),
                "head.1.weight": (2 * D,), "head.1.bias": (2 * D,), "head.3.weight": (num_labels, 2 * D),
                "head.3.bias": (num_labels,)}
    if task == "nlvr2":  # BEiT3ForVisualReasoning: TwoLayerMLP(4D -> 2D -> 2)
        return {"head.norm1.weight": (4 * D,), "head.norm1.bias": (4 * D,), "head.dense1.weight": (2 * D, 4 * D),
                "head.dense1.bias": (2 * D,), "head.norm2.weight": (2 * D,), "head.norm2.bias": (2 * D,),
                "head.dense2.weight": (2, 2 * D), "head.dense2.bias": (2,)}
    if task == "retrieval":  # BEiT3ForRetrieval: 0-dim logit_scale
        return {"vision_head.weight": (D, D), "language_head.weight": (D, D), "logit_scale": ()}
    if task == "captioning":  # BEiT3ForCaptioning
        return {"mlm_head.weight": (vocab, D), "mlm_head.bias": (vocab,)}
    raise ValueError(task)


def official_task_file(path: Path, cfg: BEiT3Config, task: str, seed: int, num_labels: int = 0,
                       heads: dict[str, tuple[int, ...]] | None = None) -> tuple[torch.nn.Module, dict[str, Tensor]]:
    """Write ``{"model": torchscale state under beit3. + heads}`` with random (perturbed) weights,
    as the official files are laid out; returns the torchscale model and the file's tensors."""
    torch.manual_seed(seed)
    official = build_official(cfg).eval()
    with torch.no_grad():
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = official_state(official)
    layout = heads if heads is not None else head_layout(task, cfg.embed_dim, num_labels, cfg.vocab_size)
    for name, shape in layout.items():
        is_norm_weight = ("norm" in name or name.startswith("head.1.")) and name.endswith("weight") and len(shape) == 1
        sd[name] = torch.randn(shape) * (0.5 if len(shape) > 1 else 0.1) + (1.0 if is_norm_weight else 0.0)
    if "logit_scale" in sd:
        sd["logit_scale"] = torch.tensor(2.9)  # log(1 / 0.07) = 2.66 after training moved it
    torch.save({"model": sd, "epoch": 3}, path)  # the official files also hold training state
    return official, sd


def _ln(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], EPS)


def captioning_mask(num_vision: int, text_len: int) -> Tensor:
    """The official captioning attention mask (1 = blocked): image->text blocked, text->text causal."""
    S, L = num_vision, text_len
    allowed = torch.zeros(S + L, S + L, dtype=torch.long)
    allowed[S:, S:] = torch.tril(torch.ones(L, L, dtype=torch.long))
    allowed[S:, :S] = 1
    allowed[:S, :S] = 1
    return 1 - allowed


@torch.no_grad()
def official_task_output(task: str, official: torch.nn.Module, sd: dict[str, Tensor], **inp: Any) -> Any:
    """The official task output from torchscale's forward and the file's head tensors.

    classification: ``images`` -> logits; vqa: ``images, text, pad`` -> logits; nlvr2: ``images,
    images2, text, pad`` -> logits; retrieval: ``images, text, pad`` -> (image, text) unit
    features; captioning: ``images, text, masked`` -> logits at the masked positions."""
    if task == "classification":
        x = official(visual_tokens=inp["images"])["encoder_out"][:, 1:].mean(1)  # [B, D]
        return F.linear(_ln(x, sd, "fc_norm"), sd["head.weight"], sd["head.bias"])
    if task == "vqa":
        x = official(textual_tokens=inp["text"], visual_tokens=inp["images"], text_padding_position=inp["pad"])
        x = x["encoder_out"][:, 0]
        pooled = torch.tanh(F.linear(_ln(x, sd, "pooler.norm"), sd["pooler.dense.weight"], sd["pooler.dense.bias"]))
        h = F.gelu(_ln(F.linear(pooled, sd["head.0.weight"], sd["head.0.bias"]), sd, "head.1"))
        return F.linear(h, sd["head.3.weight"], sd["head.3.bias"])
    if task == "nlvr2":
        text, pad, B = inp["text"], inp["pad"], inp["images"].shape[0]
        out = official(textual_tokens=torch.cat([text, text]), visual_tokens=torch.cat([inp["images"], inp["images2"]]),
                       text_padding_position=torch.cat([pad, pad]))
        x, split = out["encoder_out"], out["multiway_split_position"]
        rep = torch.cat([x[:, 0], x[:, split]], dim=-1)  # [2B, 2D]
        rep = torch.cat([rep[:B], rep[B:]], dim=-1)  # [B, 4D]
        h = F.linear(_ln(rep, sd, "head.norm1"), sd["head.dense1.weight"], sd["head.dense1.bias"])
        return F.linear(F.gelu(_ln(h, sd, "head.norm2")), sd["head.dense2.weight"], sd["head.dense2.bias"])
    if task == "retrieval":
        v = official(visual_tokens=inp["images"])["encoder_out"][:, 0]
        t = official(textual_tokens=inp["text"], text_padding_position=inp["pad"])["encoder_out"][:, 0]
        return (F.normalize(F.linear(v, sd["vision_head.weight"]), dim=-1),
                F.normalize(F.linear(t, sd["language_head.weight"]), dim=-1))
    if task == "captioning":
        images, text, masked = inp["images"], inp["text"], inp["masked"]
        S = official.vision_embed.num_position_embeddings()  # CLS + patches
        x = official(textual_tokens=text, visual_tokens=images, attn_mask=captioning_mask(S, text.shape[1]))
        return F.linear(x["encoder_out"][:, S:][masked], sd["mlm_head.weight"], sd["mlm_head.bias"])  # [M, V]
    raise ValueError(task)


__all__ = ["head_layout", "official_task_file", "official_task_output", "captioning_mask", "EPS"]
