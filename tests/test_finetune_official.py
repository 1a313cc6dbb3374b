"""Official task checkpoints (unilm ``beit3/modeling_finetune.py`` layouts) into our task models.

Each test writes a random-weight ``.pth`` exactly as the official fine-tuned files are laid
out (``{"model": ...}``: torchscale's ``BEiT3`` state under ``beit3.`` plus the head tensors,
whose names and shapes are written out below), loads it with ``model.strict_load`` semantics
(every tensor of our model from the file, nothing left over), and compares the task output
with a direct computation (``testing/official_task_heads.py``): torchscale's ``BEiT3`` forward,
then the head written out with ``F.linear`` / ``F.layer_norm`` on the file's tensors.
"""
from __future__ import annotations

import pytest
import torch

from beit3.finetune.heads import CaptioningModel, ImageClassifier, NLVR2Model, RetrievalModel, VQAModel
from beit3.finetune.train import load_weights, require_exact
from beit3.model.config import get_config

pytest.importorskip("torchscale")
from beit3.testing.official_task_heads import head_layout, official_task_file, official_task_output  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, NUM_ANSWERS, NUM_CLASSES = 64, 11, 5
D = 64  # the tiny preset's width

# the official head tensors (outside ``beit3.``), names and shapes as modeling_finetune.py builds them
LAYOUTS = {
    "classification": {"fc_norm.weight": (D,), "fc_norm.bias": (D,), "head.weight": (NUM_CLASSES, D),
                       "head.bias": (NUM_CLASSES,)},
    "vqa": {"pooler.norm.weight": (D,), "pooler.norm.bias": (D,), "pooler.dense.weight": (D, D),
            "pooler.dense.bias": (D,), "head.0.weight": (2 * D, D), "head.0.bias": (2 * D,),
            "head.1.weight": (2 * D,), "head.1.bias": (2 * D,), "head.3.weight": (NUM_ANSWERS, 2 * D),
            "head.3.bias": (NUM_ANSWERS,)},
    "nlvr2": {"head.norm1.weight": (4 * D,), "head.norm1.bias": (4 * D,), "head.dense1.weight": (2 * D, 4 * D),
              "head.dense1.bias": (2 * D,), "head.norm2.weight": (2 * D,), "head.norm2.bias": (2 * D,),
              "head.dense2.weight": (2, 2 * D), "head.dense2.bias": (2,)},
    "retrieval": {"vision_head.weight": (D, D), "language_head.weight": (D, D), "logit_scale": ()},
    "captioning": {"mlm_head.weight": (VOCAB, D), "mlm_head.bias": (VOCAB,)},
}
LABELS = {"classification": NUM_CLASSES, "vqa": NUM_ANSWERS}


def _cfg(task: str):
    return get_config("tiny", vocab_size=VOCAB, normalize_output=task not in ("classification", "vqa"))


def _model(task: str, cfg):
    return {"classification": lambda: ImageClassifier(cfg, NUM_CLASSES), "vqa": lambda: VQAModel(cfg, NUM_ANSWERS),
            "nlvr2": lambda: NLVR2Model(cfg), "retrieval": lambda: RetrievalModel(cfg),
            "captioning": lambda: CaptioningModel(cfg)}[task]()


def _inputs(cfg, batch=3, text_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    text = torch.randint(4, VOCAB, (batch, text_len), generator=g)
    pad = torch.zeros(batch, text_len, dtype=torch.bool)
    pad[-1, text_len - 3:] = True
    masked = torch.zeros_like(text, dtype=torch.bool)
    masked[:, [2, 5]] = True
    return dict(images=images, images2=torch.randn(images.shape, generator=g), text=text, pad=pad, masked=masked)


@pytest.mark.parametrize("task", list(LAYOUTS))
def test_official_task_file_loads_strictly_and_predicts_as_official(task, tmp_path):
    cfg = _cfg(task)
    assert cfg.embed_dim == D and head_layout(task, D, LABELS.get(task, 0), VOCAB) == LAYOUTS[task]
    path = tmp_path / f"official_{task}.pth"
    official, sd = official_task_file(path, cfg, task, seed=len(task), heads=LAYOUTS[task])
    if task in ("classification", "vqa"):  # no final norm in these layouts
        assert not any(k.startswith("beit3.encoder.layer_norm") for k in sd)
    model = _model(task, cfg)
    report = load_weights(model, str(path), cfg)
    require_exact(report, str(path))  # every tensor of ours from the file, nothing left over
    model.eval()
    x = _inputs(cfg)
    want = official_task_output(task, official, sd, **x)
    with torch.no_grad():
        if task == "classification":
            got = model(x["images"])
        elif task == "vqa":
            got = model(x["images"], x["text"], x["pad"])
        elif task == "nlvr2":
            got = model(x["images"], x["images2"], x["text"], x["pad"])
        elif task == "retrieval":
            img, txt, scale = model(images=x["images"], text_ids=x["text"], text_padding_mask=x["pad"])
            got = (img, txt)
            assert scale.item() == pytest.approx(sd["logit_scale"].item())  # the 0-dim scalar, reshaped
        else:
            got = model(x["images"], x["text"], None, x["masked"])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_strict_load_names_what_does_not_match(tmp_path):
    """A VQA file into an NLVR2 model: the missing and left-over head tensors are named."""
    from beit3.finetune.config import FinetuneConfigError

    cfg = _cfg("nlvr2")
    path = tmp_path / "vqa.pth"
    official_task_file(path, cfg, "vqa", seed=6, heads={"pooler.dense.weight": (D, D), "pooler.dense.bias": (D,)})
    report = load_weights(NLVR2Model(cfg), str(path), cfg)
    with pytest.raises(FinetuneConfigError, match=r"model.strict_load.*missing.*head\.norm1.*unexpected.*pooler"):
        require_exact(report, str(path))
