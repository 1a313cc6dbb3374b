"""The official fine-tuning recipes (``finetune/configs``), the batch arithmetic behind them,
the captioning loss (label smoothing, drop-worst) and RandAugment, on hand-checked values."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beit3.finetune.augment import OFFICIAL_OPS, OfficialRandAugment, randaugment_view
from beit3.finetune.config import FinetuneConfig, FinetuneConfigError, plan_batch
from beit3.finetune.losses import CaptionLossConfig, caption_token_loss
from beit3.model.config import ConfigError
from beit3.model.config_io import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "finetune" / "configs"

# the official recipes (unilm beit3/get_started/*.md, REFERENCE.md), written out by hand:
# name -> (task, img_size, lr, layer_decay, epochs, warmup epochs, drop path, weight decay, beta2,
#          head lr scale, GPUs x batch per GPU, pretrained file)
OFFICIAL = {
    "base_imagenet": ("classification", 224, 7e-4, 0.65, 50, 5, 0.15, 0.05, 0.999, 1, (8, 128), "beit3_base_patch16_224.pth"),
    "large_imagenet": ("classification", 224, 2e-4, 0.8, 50, 5, 0.25, 0.05, 0.999, 1, (8, 128), "beit3_large_patch16_224.pth"),
    "base_vqav2": ("vqa", 480, 3e-5, 1.0, 10, 1, 0.1, 0.01, 0.98, 20, (8, 16), "beit3_base_patch16_224.pth"),
    "large_vqav2": ("vqa", 480, 2e-5, 1.0, 10, 1, 0.15, 0.01, 0.98, 20, (8, 16), "beit3_large_patch16_224.pth"),
    "base_nlvr2": ("nlvr2", 224, 7e-4, 0.65, 20, 5, 0.2, 0.2, 0.999, 1, (8, 32), "beit3_base_patch16_224.pth"),
    "large_nlvr2": ("nlvr2", 224, 3e-4, 0.85, 20, 5, 0.2, 0.2, 0.999, 1, (8, 32), "beit3_large_patch16_224.pth"),
    "base_coco_retrieval": ("retrieval", 384, 2e-4, 0.65, 15, 3, 0.2, 0.05, 0.999, 1, (16, 192),
                            "beit3_base_itc_patch16_224.pth"),
    "large_coco_retrieval": ("retrieval", 384, 5e-5, 0.85, 15, 3, 0.2, 0.05, 0.999, 1, (32, 96),
                             "beit3_large_itc_patch16_224.pth"),
    "base_flickr30k_retrieval": ("retrieval", 384, 1e-4, 0.65, 20, 5, 0.2, 0.05, 0.999, 1, (16, 192),
                                 "beit3_base_itc_patch16_224.pth"),
    "large_flickr30k_retrieval": ("retrieval", 384, 5e-5, 0.85, 20, 5, 0.2, 0.05, 0.999, 1, (32, 96),
                                  "beit3_large_itc_patch16_224.pth"),
    "base_coco_captioning": ("captioning", 480, 4e-5, 1.0, 10, 1, 0.1, 0.05, 0.999, 1, (8, 32),
                             "beit3_base_patch16_224.pth"),
    "large_coco_captioning": ("captioning", 480, 8e-6, 1.0, 10, 1, 0.1, 0.05, 0.999, 1, (8, 32),
                              "beit3_large_patch16_224.pth"),
}


def test_every_recipe_file_is_listed():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(OFFICIAL)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_validates_with_official_values_and_batch_arithmetic(name):
    task, img, lr, ld, epochs, warmup, dp, wd, beta2, head, (gpus, bpg), weights = OFFICIAL[name]
    cfg = load_config(FinetuneConfig, str(CONFIGS / f"{name}.yaml"), ["data.spm=beit3.spm"])
    cfg.validate(task, eval_only=False)
    bcfg = cfg.model.backbone_config(task)
    assert (bcfg.img_size, bcfg.drop_path_rate, bcfg.embed_dim) == (img, dp, 768 if name.startswith("base") else 1024)
    assert bcfg.normalize_output == (task not in ("classification", "vqa"))
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.weight_decay, o.beta1, o.beta2, o.eps, o.min_lr) == (lr, wd, 0.9, beta2, 1e-8, 1e-6)
    assert o.warmup_from_zero  # the official scheduler's warmup (np.linspace from 0)
    assert (t.layer_decay, t.epochs, t.warmup_epochs, t.head_lr_scale, cfg.run.seed) == (ld, epochs, warmup, head, 42)
    assert Path(cfg.model.pretrained).name == weights
    assert cfg.recipe.task == task and cfg.recipe.expected and cfg.recipe.source.endswith(".md")
    # the effective batch the recipe assumes, on 8 and on 16 GPUs
    assert t.effective_batch == gpus * bpg == cfg.recipe.gpus * cfg.recipe.batch_per_gpu
    assert cfg.data.batch_size == bpg
    for world in (8, 16):
        micro, accum = plan_batch(t.effective_batch, cfg.data.batch_size, world)
        assert micro * accum * world == t.effective_batch and micro <= bpg
    with pytest.raises(FinetuneConfigError, match="recipe.task"):  # the recipe of another task
        cfg.validate("nlvr2" if task != "nlvr2" else "vqa", eval_only=False)


def _official_cosine_scheduler(base, final, total, warmup):
    """unilm beit3/utils.py ``cosine_scheduler`` as run_beit3_finetuning.py calls it (per
    optimizer step, ``start_warmup_value`` left at 0), written out from its formula."""
    head = np.linspace(0, base, warmup) if warmup > 0 else np.array([])
    n = total - warmup
    tail = np.array([final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)])
    return np.concatenate((head, tail))


@pytest.mark.parametrize("total,warmup", [(20, 5), (12, 1), (10, 0)])
def test_official_warmup_schedule_step_for_step(total, warmup):
    from beit3.runtime.optim import OptimConfig, lr_at

    cfg = OptimConfig(lr=7e-4, min_lr=1e-6, warmup_steps=warmup, total_steps=total, warmup_from_zero=True)
    ours = np.array([lr_at(k, cfg) for k in range(total)])
    assert np.allclose(ours, _official_cosine_scheduler(7e-4, 1e-6, total, warmup), rtol=1e-12, atol=1e-15)
    if warmup == 5:  # hand values: 0, lr/4, lr/2, 3lr/4, lr, then the cosine from lr
        assert np.allclose(ours[:6] / 7e-4, [0, 0.25, 0.5, 0.75, 1, 1])
        plain = OptimConfig(lr=7e-4, min_lr=1e-6, warmup_steps=5, total_steps=total)  # pretraining's warmup
        assert np.allclose([lr_at(k, plain) / 7e-4 for k in range(5)], [0.2, 0.4, 0.6, 0.8, 1.0])


def test_recipe_task_specific_options():
    def cfg(name):
        return load_config(FinetuneConfig, str(CONFIGS / f"{name}.yaml"), ["data.spm=beit3.spm"])

    cap, vqa, inet = cfg("base_coco_captioning"), cfg("large_vqav2"), cfg("base_imagenet")
    assert (cap.caption_loss.label_smoothing, cap.caption_loss.drop_worst_ratio, cap.caption_loss.drop_worst_after) \
        == (0.1, 0.2, 12000)
    assert (cap.data.caption_mask_prob, cap.data.max_text_len, cap.data.randaug) == (0.7, 32, True)
    assert cap.data.caption_mask_style == "official"
    g = cap.generation
    assert (g.num_beams, g.length_penalty, g.style, g.max_len) == (3, 0.6, "official", 32)
    assert vqa.data.randaug and (vqa.data.randaug_num_ops, vqa.data.randaug_magnitude) == (2, 7)
    m = inet.mixup
    assert (m.mixup_alpha, m.cutmix_alpha, m.label_smoothing, inet.data.num_classes) == (0.8, 1.0, 0.1, 1000)
    assert (inet.data.normalize, inet.data.eval_center_crop, inet.data.train_transform) == \
        ("imagenet", True, "timm_imagenet")
    assert not any(cfg(n).data.randaug for n in OFFICIAL if "vqav2" not in n and "captioning" not in n)
    # the official vision-language training view: RandomResizedCrop(0.5, 1) + horizontal flip
    assert all(cfg(n).data.train_flip and tuple(cfg(n).data.crop_scale) == (0.5, 1.0) for n in OFFICIAL
               if "imagenet" not in n)


def test_plan_batch_hand_values():
    assert plan_batch(1024, 128, 8) == (128, 1)
    assert plan_batch(1024, 128, 16) == (64, 1)  # more GPUs: smaller micro batches, no accumulation
    assert plan_batch(3072, 96, 8) == (96, 4)  # large retrieval (32 x 96) on 8 GPUs: accumulate 4
    assert plan_batch(3072, 192, 16) == (192, 1)
    assert plan_batch(256, 24, 8) == (16, 2)  # 256 / 8 = 32 > 24: 2 steps of 16
    with pytest.raises(FinetuneConfigError, match="train.effective_batch"):
        plan_batch(100, 16, 8)  # no whole split of 100 samples over 8 ranks


def test_recipe_batch_mismatch_and_warmup_fail_naming_the_field():
    path = str(CONFIGS / "base_nlvr2.yaml")
    with pytest.raises(FinetuneConfigError, match="train.effective_batch"):
        load_config(FinetuneConfig, path, ["train.effective_batch=512"]).validate("nlvr2", False)
    with pytest.raises(FinetuneConfigError, match="train.warmup_epochs"):
        load_config(FinetuneConfig, path, ["optim.warmup_steps=10"]).validate("nlvr2", False)
    with pytest.raises(FinetuneConfigError, match="caption_loss"):
        load_config(FinetuneConfig, path, ["caption_loss.label_smoothing=0.1"]).validate("nlvr2", False)
    with pytest.raises(ConfigError, match="caption_loss.drop_worst_ratio"):
        load_config(FinetuneConfig, path, ["caption_loss.drop_worst_ratio=1.5"])
    with pytest.raises(FinetuneConfigError, match="data.randaug_magnitude"):
        load_config(FinetuneConfig, path, ["data.randaug_magnitude=11"]).validate("nlvr2", False)


# ---------------------------------------------------------------------------- captioning loss

# p = softmax(logits) = (0.5, 0.25, 0.25) on every token
_LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.25]])).repeat(5, 1)
_TARGETS = torch.tensor([0, 1, 0, 1, 2])  # token losses ln 2, ln 4, ln 2, ln 4, ln 4


def test_caption_loss_plain_is_cross_entropy():
    got = caption_token_loss(_LOGITS, _TARGETS, CaptionLossConfig(), step=0)
    assert got.item() == pytest.approx((2 * math.log(2) + 3 * math.log(4)) / 5)  # = 8 ln2 / 5


def test_caption_label_smoothing_hand_value():
    # eps 0.1 over V = 3: target (0.9, 0.05, 0.05); KL = 0.9 ln(0.9/0.5) + 2 x 0.05 ln(0.05/0.25)
    got = caption_token_loss(_LOGITS[:1], _TARGETS[:1], CaptionLossConfig(label_smoothing=0.1), step=0)
    assert got.item() == pytest.approx(0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.05 / 0.25), abs=1e-6)
    assert got.item() == pytest.approx(0.368064, abs=1e-6)
    # a perfect prediction of the smoothed target costs 0
    perfect = torch.log(torch.tensor([[0.9, 0.05, 0.05]]))
    assert caption_token_loss(perfect, torch.tensor([0]), CaptionLossConfig(label_smoothing=0.1), 0).item() \
        == pytest.approx(0.0, abs=1e-6)


def test_caption_drop_worst_after_the_step():
    cfg = CaptionLossConfig(drop_worst_ratio=0.2, drop_worst_after=100)
    # step <= 100: every token counts; after: int(5 x 0.8) = 4 smallest (one ln 4 dropped)
    assert caption_token_loss(_LOGITS, _TARGETS, cfg, step=100).item() == pytest.approx(8 * math.log(2) / 5)
    assert caption_token_loss(_LOGITS, _TARGETS, cfg, step=101).item() == pytest.approx(1.5 * math.log(2))
    # gradients reach only the kept tokens
    logits = _LOGITS.clone().requires_grad_(True)
    caption_token_loss(logits, _TARGETS, cfg, step=101).backward()
    assert (logits.grad.abs().sum(dim=1) > 0).sum().item() == 4


def test_caption_masking_counts_and_official_replacement():
    from beit3.finetune.datasets import mask_caption

    ids = [0, 11, 12, 13, 14, 15, 16, 17, 18, 2]  # BOS, 8 words, EOS: L = 10
    MASK, V = 99, 64
    # ours: int((L - 1) x 0.7) = 6 positions after BOS, all [MASK]
    text, masked, targets = mask_caption(ids, 0.7, MASK, np.random.default_rng(0))
    assert sum(masked) == 6 and not masked[0] and all(t == MASK for t, m in zip(text, masked) if m)
    assert targets == [i for i, m in zip(ids, masked) if m] and text[0] == 0
    # official: min(int(L x 0.7 + 0.5), L - 1) = 7 positions; short captions keep >= 1 and <= L - 1
    assert sum(mask_caption(ids, 0.7, MASK, np.random.default_rng(0), V)[1]) == 7
    assert sum(mask_caption([0, 5, 2], 0.1, MASK, np.random.default_rng(0), V)[1]) == 1
    assert sum(mask_caption([0, 5, 2], 0.99, MASK, np.random.default_rng(0), V)[1]) == 2
    # of the masked positions 80% [MASK], 10% kept, 10% a random id in [3, V - 1]; all predicted
    kinds = {"mask": 0, "kept": 0, "random": 0}
    for seed in range(600):
        text, masked, targets = mask_caption(ids, 0.7, MASK, np.random.default_rng(seed), V)
        assert targets == [i for i, m in zip(ids, masked) if m]
        for t, m, orig in zip(text, masked, ids):
            if not m:
                assert t == orig
            elif t == MASK:
                kinds["mask"] += 1
            elif t == orig:
                kinds["kept"] += 1
            else:
                assert 3 <= t < V
                kinds["random"] += 1
    total = sum(kinds.values())
    assert total == 600 * 7
    assert kinds["mask"] / total == pytest.approx(0.8, abs=0.02)
    assert kinds["kept"] / total == pytest.approx(0.1, abs=0.015)  # (a random id equal to the original: ~0.1/61)
    assert kinds["random"] / total == pytest.approx(0.1, abs=0.015)


# ---------------------------------------------------------------------------- RandAugment


def test_randaugment_official_ops_and_level_7_magnitudes():
    aug = OfficialRandAugment()
    assert (aug.num_ops, aug.magnitude, aug.num_magnitude_bins, aug.prob) == (2, 7, 11, 0.5)
    space = aug._augmentation_space(aug.num_magnitude_bins, (32, 32))
    assert tuple(space) == OFFICIAL_OPS and len(space) == 10
    at7 = {k: float(v[7]) for k, (v, _) in space.items() if v.ndim}
    # official level 7 of 10: enhance factor 0.7 x 1.8 + 0.1 = 1.36, shear 0.21, translate 7 px, rotate 21 deg
    assert at7 == pytest.approx({"Brightness": 0.36, "Sharpness": 0.36, "ShearX": 0.21, "ShearY": 0.21,
                                 "TranslateX": 7.0, "TranslateY": 7.0, "Rotate": 21.0}, abs=1e-6)
    assert not space["Brightness"][1] and space["Rotate"][1]  # enhance unsigned, geometry signed


class _BrightnessOnly(OfficialRandAugment):
    def _augmentation_space(self, num_bins, image_size):
        return {"Brightness": super()._augmentation_space(num_bins, image_size)["Brightness"]}


def test_randaugment_applies_each_op_with_probability_half():
    """Brightness only, 2 ops on a flat grey 100 image: 100 (neither applied, p 1/4), 136 (one,
    p 1/2) or 184 (both: 136 x 1.36 = 184.96, truncated as the official uint8 cast), seeded per sample."""
    img = Image.new("RGB", (8, 8), (100, 100, 100))
    aug = _BrightnessOnly()
    values = [randaugment_view(img, aug, np.random.default_rng(i)).getpixel((0, 0))[0] for i in range(400)]
    counts = {v: values.count(v) / len(values) for v in set(values)}
    assert set(counts) == {100, 136, 184}
    assert counts[100] == pytest.approx(0.25, abs=0.07) and counts[136] == pytest.approx(0.5, abs=0.08)
    again = [randaugment_view(img, aug, np.random.default_rng(i)).getpixel((0, 0))[0] for i in range(400)]
    assert again == values  # the view depends on the sample's generator only


def test_randaugment_in_the_training_view_only():
    from beit3.finetune.datasets import ImageViewConfig, image_view

    rng_img = np.random.default_rng(0)
    img = Image.fromarray(rng_img.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    plain = ImageViewConfig(32, True, (1.0, 1.0))
    aug = ImageViewConfig(32, True, (1.0, 1.0), randaug_ops=2)
    views = [(image_view(img, plain, np.random.default_rng(i)), image_view(img, aug, np.random.default_rng(i)))
             for i in range(12)]
    changed = sum(not torch.equal(a, b) for a, b in views)
    assert 6 <= changed <= 12  # P(neither op applied or both identity-like) is small
    evaluation = ImageViewConfig(32, False, randaug_ops=2)
    assert torch.equal(image_view(img, evaluation, np.random.default_rng(0)),
                       image_view(img, ImageViewConfig(32, False), np.random.default_rng(1)))


def test_timm_imagenet_train_view_is_timms_official_transform():
    """``data.train_transform=timm_imagenet``: timm's ``create_transform`` with the official
    arguments (rand-m9-mstd0.5-inc1, random erasing 0.25), seeded per sample: the view equals
    timm's transform run after seeding torch/numpy/random the same way, and repeats per seed."""
    pytest.importorskip("timm")
    import random

    from timm.data import create_transform

    from beit3.finetune.datasets import ImageViewConfig, image_view

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8))
    cfg = ImageViewConfig(32, True, normalize="imagenet", train_transform="timm_imagenet")
    ref = create_transform(input_size=32, is_training=True, color_jitter=0.4, auto_augment="rand-m9-mstd0.5-inc1",
                           interpolation="bicubic", re_prob=0.25, re_mode="pixel", re_count=1)
    views = []
    for i in range(6):
        got = image_view(img, cfg, np.random.default_rng(i))
        seed = int(np.random.default_rng(i).integers(2 ** 31))
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        assert got.shape == (3, 32, 32) and torch.equal(got, ref(img))
        assert torch.equal(got, image_view(img, cfg, np.random.default_rng(i)))
        views.append(got)
    assert len({v.sum().item() for v in views}) == 6
    with pytest.raises(FinetuneConfigError, match="data.train_transform"):
        load_config(FinetuneConfig, str(CONFIGS / "base_imagenet.yaml"),
                    ["data.normalize=inception"]).validate("classification", False)
