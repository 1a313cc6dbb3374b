"""The demo's evidence functions (``demo/evaluation.py``) on the real held-out demo digits."""
import json

import pytest
import torch

from beit3.demo import run as demo
from beit3.demo.evaluation import (linear_probe, load_digit_folder, masked_caption_zero_shot, pretraining_curves,
                                      prompt_features)


@pytest.mark.slow
def test_raw_pixel_probe_reads_digits(demo_data):
    x, y = load_digit_folder([demo_data.finetune_train])
    xt, yt = load_digit_folder([demo_data.finetune_test])
    assert x.shape[1:] == (3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0
    n = 200  # a random subset of all ten digits keeps the test fast (the folders list the digits in order)
    g = torch.Generator().manual_seed(0)
    tr, te = torch.randperm(len(y), generator=g)[:n], torch.randperm(len(yt), generator=g)[:n]
    x, y, xt, yt = x[tr].flatten(1).numpy(), y[tr], xt[te].flatten(1).numpy(), yt[te].numpy()
    acc = linear_probe(x, y.numpy(), xt, yt)
    assert acc > 0.7, acc  # logistic regression on the pixels of 8x8 digits is a strong baseline
    shuffled = linear_probe(x, y[torch.randperm(n, generator=g)].numpy(), xt, yt)
    assert shuffled < 0.3, shuffled  # labels carry the signal: on permuted labels it is near chance (0.1)


def test_random_init_names_at_chance_and_features_have_the_width(demo_data, tmp_path, one_thread):
    from beit3.data_pipeline import TextTokenizer
    from beit3.model import BEiT3ForPretraining, get_config

    tok = TextTokenizer(demo_data.spm_path)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, num_visual_tokens=128, max_text_positions=66)
    (tmp_path / "config.json").write_text(json.dumps({"model": cfg.to_dict()}))
    torch.manual_seed(3)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in BEiT3ForPretraining(cfg).state_dict().items()},
              str(tmp_path / "model.safetensors"))
    acc = masked_caption_zero_shot(tmp_path, demo_data.spm_path, [demo_data.finetune_test])
    assert 0.0 <= acc <= 0.3, acc  # untrained: chance is 0.1
    from beit3.demo.evaluation import load_pretraining_model

    images, _ = load_digit_folder([demo_data.finetune_test])
    feats = prompt_features(load_pretraining_model(tmp_path), images[:8], tok)
    assert feats.shape == (8, cfg.embed_dim) and torch.isfinite(feats).all()


def test_curves_keep_the_last_logged_row_of_a_step(tmp_path):
    rows = [{"step": s, "image/mim_acc": s / 100, "pair/mim_acc": 0.1, "text/mlm_acc": 0.2, "pair/mlm_acc": 0.3}
            for s in (10, 20, 30, 40)]
    rows.insert(3, {**rows[1], "image/mim_acc": 0.99})  # a resume re-logs step 20
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    c = pretraining_curves(tmp_path / "m.jsonl", points=4)
    assert c["step"] == [10, 20, 30, 40]
    assert c["image/mim_acc"] == [0.1, 0.99, 0.3, 0.4]


@pytest.mark.parametrize("zs,met", [(0.61, True), (0.59, False)])
def test_goals_name_each_figure_and_whether_it_is_met(zs, met):
    s = {"heldout_linear_probe_top1": {"raw_pixels": {"pixels": 0.9},
                                       "pretrained": {"vision": 0.8, "fused": 0.95},
                                       "random_init": {"vision": 0.6, "fused": 0.6}},
         "heldout_classification": {"pretrained": {"top1": 0.9}},
         "heldout_zero_shot_naming_top1": {"pretrained": zs}}
    g = demo.goals(s)
    assert g["zero-shot naming >= 0.6"]["met"] is met
    assert g["probe (vision) pretrained - random >= 0.25"] == {"value": 0.2, "met": False}
    assert g["probe (fused) pretrained - random >= 0.25"]["met"] is True
    assert g["fine-tune pretrained - raw pixels >= 0"]["met"] is True
