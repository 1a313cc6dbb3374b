"""Official task checkpoints (unilm ``beit3/modeling_finetune.py`` layouts) into our task models.

Each test writes a random-weight ``.pth`` exactly as the official fine-tuned files are laid
out (``{"model": ...}``: torchscale's ``BEiT3`` state under ``beit3.`` plus the head tensors,
whose names and shapes are written out below), loads it with ``model.strict_load`` semantics
(every tensor of our model from the file, nothing left over), and compares the task output
with a direct computation: torchscale's ``BEiT3`` forward, then the head written out with
``F.linear`` / ``F.layer_norm`` on the file's tensors.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from beit3.finetune.heads import CaptioningModel, ImageClassifier, NLVR2Model, RetrievalModel, VQAModel
from beit3.finetune.train import load_weights, require_exact
from beit3.model.config import get_config
from tests.official_reference import build_official, official_state

pytest.importorskip("torchscale")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, NUM_ANSWERS, NUM_CLASSES, EPS = 64, 11, 5, 1e-5


def _cfg(normalize_output: bool):
    return get_config("tiny", vocab_size=VOCAB, normalize_output=normalize_output)


def _official_file(tmp_path, cfg, heads: dict[str, tuple[int, ...]], seed: int):
    """The official backbone (perturbed random weights) and a ``.pth`` of it plus ``heads``
    (name -> shape, random values); returns (torchscale model, file path, file tensors)."""
    torch.manual_seed(seed)
    official = build_official(cfg).eval()
    with torch.no_grad():
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    sd = official_state(official)
    for name, shape in heads.items():
        sd[name] = torch.randn(shape) * (0.5 if len(shape) > 1 else 0.1) + (1.0 if "norm" in name and
                                                                          name.endswith("weight") else 0.0)
    path = tmp_path / "official_task.pth"
    torch.save({"model": sd, "epoch": 3}, path)  # the official files also hold training state
    return official, path, sd


def _load_strict(model, path, cfg):
    report = load_weights(model, str(path), cfg)
    require_exact(report, str(path))
    return model.eval()


def _ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], EPS)


def _inputs(cfg, batch=3, text_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    text = torch.randint(4, VOCAB, (batch, text_len), generator=g)
    pad = torch.zeros(batch, text_len, dtype=torch.bool)
    pad[-1, text_len - 3:] = True
    return images, text, pad


def test_imagenet_head(tmp_path):
    cfg = _cfg(normalize_output=False)
    D = cfg.embed_dim
    official, path, sd = _official_file(tmp_path, cfg, {"fc_norm.weight": (D,), "fc_norm.bias": (D,),
                                                        "head.weight": (NUM_CLASSES, D),
                                                        "head.bias": (NUM_CLASSES,)}, seed=1)
    assert not any(k.startswith("beit3.encoder.layer_norm") for k in sd)  # no final norm in this layout
    model = _load_strict(ImageClassifier(cfg, NUM_CLASSES), path, cfg)
    images, _, _ = _inputs(cfg)
    with torch.no_grad():
        x = official(visual_tokens=images)["encoder_out"]  # [B, 1 + P, D]
        want = F.linear(_ln(x[:, 1:].mean(1), sd, "fc_norm"), sd["head.weight"], sd["head.bias"])
        got = model(images)
    assert got.shape == (3, NUM_CLASSES)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_vqav2_head(tmp_path):
    cfg = _cfg(normalize_output=False)
    D = cfg.embed_dim
    heads = {"pooler.norm.weight": (D,), "pooler.norm.bias": (D,), "pooler.dense.weight": (D, D),
             "pooler.dense.bias": (D,), "head.0.weight": (2 * D, D), "head.0.bias": (2 * D,),
             "head.1.weight": (2 * D,), "head.1.bias": (2 * D,), "head.3.weight": (NUM_ANSWERS, 2 * D),
             "head.3.bias": (NUM_ANSWERS,)}
    official, path, sd = _official_file(tmp_path, cfg, heads, seed=2)
    model = _load_strict(VQAModel(cfg, NUM_ANSWERS), path, cfg)
    images, text, pad = _inputs(cfg)
    with torch.no_grad():
        x = official(textual_tokens=text, visual_tokens=images, text_padding_position=pad)["encoder_out"]
        pooled = torch.tanh(F.linear(_ln(x[:, 0], sd, "pooler.norm"), sd["pooler.dense.weight"],
                                     sd["pooler.dense.bias"]))
        h = F.gelu(_ln(F.linear(pooled, sd["head.0.weight"], sd["head.0.bias"]), sd, "head.1"))
        want = F.linear(h, sd["head.3.weight"], sd["head.3.bias"])
        got = model(images, text, pad)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_nlvr2_head(tmp_path):
    cfg = _cfg(normalize_output=True)
    D = cfg.embed_dim
    heads = {"head.norm1.weight": (4 * D,), "head.norm1.bias": (4 * D,), "head.dense1.weight": (2 * D, 4 * D),
             "head.dense1.bias": (2 * D,), "head.norm2.weight": (2 * D,), "head.norm2.bias": (2 * D,),
             "head.dense2.weight": (2, 2 * D), "head.dense2.bias": (2,)}
    official, path, sd = _official_file(tmp_path, cfg, heads, seed=3)
    model = _load_strict(NLVR2Model(cfg), path, cfg)
    images, text, pad = _inputs(cfg)
    images2 = torch.randn_like(images)
    with torch.no_grad():
        out = official(textual_tokens=torch.cat([text, text]), visual_tokens=torch.cat([images, images2]),
                       text_padding_position=torch.cat([pad, pad]))
        x, split = out["encoder_out"], out["multiway_split_position"]
        rep = torch.cat([x[:, 0], x[:, split]], dim=-1)  # [2B, 2D]
        rep = torch.cat([rep[:3], rep[3:]], dim=-1)  # [B, 4D]
        h = F.linear(_ln(rep, sd, "head.norm1"), sd["head.dense1.weight"], sd["head.dense1.bias"])
        want = F.linear(F.gelu(_ln(h, sd, "head.norm2")), sd["head.dense2.weight"], sd["head.dense2.bias"])
        got = model(images, images2, text, pad)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_retrieval_heads(tmp_path):
    cfg = _cfg(normalize_output=True)
    D = cfg.embed_dim
    heads = {"vision_head.weight": (D, D), "language_head.weight": (D, D), "logit_scale": ()}
    official, path, sd = _official_file(tmp_path, cfg, heads, seed=4)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07) + 0.3)  # a 0-dim scalar, as the official parameter
    torch.save({"model": sd}, path)
    model = _load_strict(RetrievalModel(cfg), path, cfg)
    images, text, pad = _inputs(cfg)
    with torch.no_grad():
        v = official(visual_tokens=images)["encoder_out"][:, 0]
        t = official(textual_tokens=text, text_padding_position=pad)["encoder_out"][:, 0]
        want_v = F.normalize(F.linear(v, sd["vision_head.weight"]), dim=-1)
        want_t = F.normalize(F.linear(t, sd["language_head.weight"]), dim=-1)
        img, txt, scale = model(images=images, text_ids=text, text_padding_mask=pad)
    torch.testing.assert_close(img, want_v, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(txt, want_t, atol=1e-5, rtol=1e-4)
    assert scale.item() == pytest.approx(sd["logit_scale"].item())


def test_captioning_head(tmp_path):
    cfg = _cfg(normalize_output=True)
    D = cfg.embed_dim
    official, path, sd = _official_file(tmp_path, cfg, {"mlm_head.weight": (VOCAB, D), "mlm_head.bias": (VOCAB,)},
                                        seed=5)
    model = _load_strict(CaptioningModel(cfg), path, cfg)
    images, text, _ = _inputs(cfg)
    S, L = cfg.num_vision_tokens, text.shape[1]
    masked = torch.zeros_like(text, dtype=torch.bool)
    masked[:, [2, 5]] = True
    # the official captioning mask (1 = blocked): image->text blocked, text->text causal
    allowed = torch.zeros(S + L, S + L, dtype=torch.long)
    allowed[S:, S:] = torch.tril(torch.ones(L, L, dtype=torch.long))
    allowed[S:, :S] = 1
    allowed[:S, :S] = 1
    with torch.no_grad():
        x = official(textual_tokens=text, visual_tokens=images, attn_mask=1 - allowed)["encoder_out"]
        want = F.linear(x[:, S:][masked], sd["mlm_head.weight"], sd["mlm_head.bias"])  # [M, V]
        got = model(images, text, None, masked)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_strict_load_names_what_does_not_match(tmp_path):
    """A VQA file into an NLVR2 model: the missing and left-over head tensors are named."""
    from beit3.finetune.config import FinetuneConfigError

    cfg = _cfg(normalize_output=True)
    D = cfg.embed_dim
    _, path, _ = _official_file(tmp_path, cfg, {"pooler.dense.weight": (D, D), "pooler.dense.bias": (D,)}, seed=6)
    with pytest.raises(FinetuneConfigError, match=r"model.strict_load.*missing.*head\.norm1.*unexpected.*pooler"):
        _load_strict(NLVR2Model(cfg), path, cfg)
