"""The demo's "does pretraining pay off" evidence on digits never seen in pretraining.

Everything here compares the exported pretrained weights with the same model at random
initialization (and, where it applies, with raw pixels) on the same held-out split:

- ``linear_probe``: logistic regression on frozen backbone features (vision encoder: CLS and mean
  patch token of the last layer), or on the raw pixels;
- ``masked_caption_zero_shot``: no training at all: the fused encoder reads the image and "a
  handwritten digit <mask>", and the pretraining MLM head names the digit;
- ``pretraining_curves`` / ``codebook_usage``: the MIM/MLM accuracy per part over the run, and how
  much of the frozen VQ-KD codebook the pretraining images use.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from beit3.demo.digits import NAMES


def load_digit_folder(folders: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[B, 3, H, W]`` in [0, 1] and labels ``[B]`` of ImageFolder trees named by ``NAMES``."""
    from PIL import Image

    files = sorted(f for folder in folders for f in Path(folder).glob("*/*.png"))
    if not files:
        raise FileNotFoundError(f"no */*.png under {[str(f) for f in folders]}")
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                          for f in files]) / 255.0
    labels = torch.tensor([NAMES.index(f.parent.name) for f in files])
    return images, labels


def load_pretraining_model(export_dir: Path, pretrained: bool = True, seed: int = 0):
    """``BEiT3ForPretraining`` of an export folder: its weights, or (``pretrained=False``) the same
    architecture at random initialization (seeded)."""
    from beit3.model import BEiT3Config, BEiT3ForPretraining

    torch.manual_seed(seed)
    model = BEiT3ForPretraining(BEiT3Config.from_dict(json.loads((Path(export_dir) / "config.json").read_text())["model"]))
    if pretrained:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(export_dir) / "model.safetensors")))
    return model.eval()


@torch.no_grad()
def backbone_features(model, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Frozen vision-encoder features ``[B, 2D]``: last-layer CLS and mean patch token."""
    feats = []
    for i in range(0, len(images), batch):
        out = model.beit3(images=images[i:i + batch] * 2.0 - 1.0)  # the loader's [-1, 1] normalization
        v = out.vision  # [b, 1 + P, D]
        feats.append(torch.cat([v[:, 0], v[:, 1:].mean(1)], dim=-1).float())
    return torch.cat(feats)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Top-1 of a standardized multinomial logistic regression (C by 3-fold CV on the train split)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=[0.01, 0.1, 1.0, 10.0], cv=3, max_iter=3000))
    with warnings.catch_warnings():  # scikit-learn's notices about future defaults
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(train_x, train_y)
    return float(clf.score(test_x, test_y))


@torch.no_grad()
def prompt_features(model, images: torch.Tensor, tok, template: str = "a handwritten digit {}",
                    batch: int = 256) -> torch.Tensor:
    """Frozen fused-encoder features ``[B, D]``: the last-layer state at the masked name position of
    ``template`` read together with the image (what the MLM head sees, before the head)."""
    ids = torch.tensor(tok.encode_with_specials(template.format("").rstrip(), 64))
    ids = torch.cat([ids[:-1], torch.tensor([tok.mask_id]), ids[-1:]])  # BOS prompt <mask> EOS
    feats = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch] * 2.0 - 1.0
        out = model.beit3(images=x, text_ids=ids.expand(len(x), -1))
        feats.append(out.text[:, -2].float())  # [b, D] at <mask>
    return torch.cat(feats)


def probes(export_dir: Path, spm_path: str, train: Sequence[Path], test: Sequence[Path]) -> dict[str, dict[str, float]]:
    """Linear-probe top-1 on frozen features (vision encoder; fused encoder with the naming prompt),
    pretrained and random init, and on raw pixels."""
    from beit3.data_pipeline import TextTokenizer

    tok = TextTokenizer(spm_path)
    (xtr, ytr), (xte, yte) = load_digit_folder(train), load_digit_folder(test)
    out: dict[str, dict[str, float]] = {
        "raw_pixels": {"pixels": linear_probe(xtr.flatten(1).numpy(), ytr.numpy(), xte.flatten(1).numpy(), yte.numpy())}}
    for name in ("pretrained", "random_init"):
        model = load_pretraining_model(export_dir, pretrained=name == "pretrained")
        out[name] = {
            "vision": linear_probe(backbone_features(model, xtr).numpy(), ytr.numpy(),
                                   backbone_features(model, xte).numpy(), yte.numpy()),
            "fused": linear_probe(prompt_features(model, xtr, tok).numpy(), ytr.numpy(),
                                  prompt_features(model, xte, tok).numpy(), yte.numpy())}
    return out


@torch.no_grad()
def masked_caption_zero_shot(export_dir: Path, spm_path: str, folders: Sequence[Path], pretrained: bool = True,
                             template: str = "a handwritten digit {}") -> float:
    """Top-1 of naming digits with the MLM head alone: the fused encoder reads the image and
    ``template`` with the digit's name masked; the class whose name tokens get the highest
    log-likelihood wins. ``pretrained=False``: the same model at random initialization."""
    from beit3.data_pipeline import TextTokenizer

    tok = TextTokenizer(spm_path)
    model = load_pretraining_model(export_dir, pretrained)
    images, labels = load_digit_folder(folders)
    images = images * 2.0 - 1.0  # [B, 3, H, W] in [-1, 1], as the loader normalizes
    prefix = len(tok.encode(template.format("").rstrip()))
    B = len(images)
    scores = []
    for name in NAMES:  # log p(name tokens | image, masked caption)
        ids = torch.tensor(tok.encode_with_specials(template.format(name), 64))
        pos = torch.arange(1 + prefix, len(ids) - 1)
        masked = torch.zeros(len(ids), dtype=torch.bool)
        masked[pos] = True
        out = model(images=images, text_ids=ids.masked_fill(masked, tok.mask_id).expand(B, -1),
                    text_padding_mask=torch.zeros(B, len(ids), dtype=torch.bool), text_mask=masked.expand(B, -1))
        logp = out.mlm_logits.float().log_softmax(-1).view(B, len(pos), -1)  # [B, T, V]
        scores.append(logp.gather(-1, ids[pos].view(1, -1, 1).expand(B, -1, 1)).squeeze(-1).sum(-1))
    return float((torch.stack(scores, 1).argmax(1) == labels).float().mean())


CURVE_KEYS = ("image/mim_acc", "pair/mim_acc", "text/mlm_acc", "pair/mlm_acc")


def pretraining_curves(metrics_jsonl: Path, points: int = 6) -> dict[str, list]:
    """MIM/MLM accuracy per part at ``points`` evenly spaced logged steps (the last one included)."""
    rows: dict[int, dict] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row  # a resumed run re-logs steps after its checkpoint: keep the last
    steps = sorted(rows)
    picks = sorted({steps[round(i * (len(steps) - 1) / max(1, points - 1))] for i in range(points)})
    return {"step": picks, **{k: [round(rows[s].get(k, float("nan")), 4) for s in picks] for k in CURVE_KEYS}}


@torch.no_grad()
def codebook_usage(tokenizer_path: str, folders: Sequence[Path]) -> dict[str, float]:
    """Codes of the frozen VQ-KD used by the pretraining images: count, fraction, perplexity."""
    from beit3.pretrain.targets import VisualTokenTargets

    targets = VisualTokenTargets.from_checkpoint(tokenizer_path)
    images, _ = load_digit_folder(folders)
    codes = torch.cat([targets.codes(images[i:i + 256]).reshape(-1) for i in range(0, len(images), 256)])
    counts = torch.bincount(codes, minlength=targets.num_codes).double()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    used = int((counts > 0).sum())
    return {"codes_used": used, "num_codes": targets.num_codes, "fraction": round(used / targets.num_codes, 4),
            "perplexity": round(perplexity, 2)}


__all__ = ["load_digit_folder", "load_pretraining_model", "backbone_features", "linear_probe", "probes",
           "prompt_features", "masked_caption_zero_shot", "pretraining_curves", "codebook_usage", "CURVE_KEYS"]
