"""Recipe options through the real trainer on the digits corpus (one process, DeepSpeed on CPU):
the effective batch by gradient accumulation with warmup in epochs, the captioning loss and
RandAugment; ``--eval`` of an official-layout ImageNet task file (strict) against a direct
computation on torchscale; the zero-shot prompt ensemble against its hand computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from beit3.data_pipeline.tokenizer import BOS_ID, EOS_ID
from beit3.finetune.config import FinetuneConfig
from beit3.finetune.tasks import TASKS
from beit3.finetune.train import Trainer, main
from beit3.model.config_io import load_config
from tests.test_finetune_tasks import base_args, ft_data  # noqa: F401  (the module-scoped corpus fixture)


def _trainer(task: str, overrides: list[str], eval_only: bool = False) -> Trainer:
    from beit3.data_pipeline.tokenizer import TextTokenizer
    from beit3.runtime.engine import init_distributed

    cfg = load_config(FinetuneConfig, None, overrides)
    cfg.validate(task, eval_only)
    init_distributed()
    return Trainer(TASKS[task](cfg, TextTokenizer(cfg.data.spm)), cfg, eval_only)


def test_effective_batch_accumulates_and_warmup_epochs(ft_data, tmp_path):
    """Captioning with the recipe's options: 32 samples per optimizer step from micro batches of
    at most 16 on one rank -> 2 accumulated micro batches; one epoch of 720 captions = 22
    optimizer steps (44 micro steps), half an epoch of warmup = 11 steps."""
    idx = ft_data["idx"]
    tr = _trainer("captioning", [*base_args(ft_data, tmp_path), f"data.train_index={idx / 'digits_captioning.train.jsonl'}",
                                 "train.effective_batch=32", "train.epochs=1", "train.warmup_epochs=0.5",
                                 "optim.lr=1e-3", "data.randaug=true", "caption_loss.label_smoothing=0.1",
                                 "caption_loss.drop_worst_ratio=0.2", "caption_loss.drop_worst_after=5",
                                 "data.caption_mask_prob=0.7", "data.caption_mask_style=official",
                                 "optim.warmup_from_zero=true"])
    assert (tr.micro_batch, tr.accum, tr.steps_per_epoch, tr.total_steps) == (16, 2, 22, 22)
    assert tr.optim.warmup_steps == 11 and tr.engine.gradient_accumulation_steps() == 2
    assert tr.scheduler.get_last_lr()[-1] == 0.0  # the official warmup: the first step at lr 0
    res = tr.train()
    assert res["steps"] == 22 == tr.engine.global_steps and tr.engine.micro_steps == 44
    assert tr.task.step == 21  # drop-worst saw the optimizer step, not the micro step
    assert torch.isfinite(torch.tensor(res["final_loss"]))


def test_eval_of_official_imagenet_file_equals_direct_computation(ft_data, tmp_path):
    """``classification --eval model.strict_load=true`` on an official-layout file, with the
    official ImageNet eval transform (resize, center crop, ImageNet mean/std): our logits and
    top-1 equal torchscale's ``BEiT3`` + the head on the file's tensors, on images prepared
    by torchvision's transforms."""
    pytest.importorskip("torchscale")
    from torchvision import transforms as T

    from beit3.testing.official_task_heads import official_task_file, official_task_output

    from beit3.finetune.datasets import IMAGENET_MEAN, IMAGENET_STD, load_image
    from beit3.finetune.formats import read_index
    from beit3.model.config import get_config

    c, idx = ft_data["corpus"], ft_data["idx"]
    cfg = get_config("tiny", vocab_size=ft_data["vocab"], normalize_output=False)
    path = tmp_path / "beit3_tiny_imagenet.pth"
    official, sd = official_task_file(path, cfg, "classification", seed=7, num_labels=3)
    args = [*base_args(ft_data, tmp_path / "ev"), f"data.eval_index={idx / 'colors.val.jsonl'}",
            f"data.classes={c.color_classes}", f"model.pretrained={path}", "model.strict_load=true",
            "data.normalize=imagenet", "data.eval_center_crop=true"]
    res = main(["classification", "--eval", *args])["final"]
    rows, _ = read_index(idx / "colors.val.jsonl", "classification")
    prep = T.Compose([T.Resize(cfg.img_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(cfg.img_size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images = torch.stack([prep(load_image(ft_data["root"] / r["image_path"])) for r in rows])
    labels = torch.tensor([int(r["label"]) for r in rows])
    want = official_task_output("classification", official, sd, images=images)  # [N, 3]
    with torch.no_grad():
        ours = _trainer("classification", args, eval_only=True).engine.module.eval()
        got = ours(images)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert res["num_examples"] == len(rows) == 60
    assert res["top1"] == pytest.approx((want.argmax(-1) == labels).float().mean().item())


def test_zeroshot_clip_prompt_ensemble_hand_computation(ft_data, tmp_path):
    """``data.zeroshot_prompts=clip7``: 7 prompts per class name; a class embedding is the
    renormalized mean of the unit text features of its prompts."""
    from beit3.finetune.heads import zero_shot_class_embeddings
    from beit3.finetune.prompts import CLIP_IMAGENET_SELECTED

    c = ft_data["corpus"]
    args = [*base_args(ft_data, tmp_path), f"data.eval_index={ft_data['idx'] / 'colors.val.jsonl'}",
            f"data.classes={c.color_classes}", "data.zeroshot_prompts=clip7"]
    tr = _trainer("zeroshot", args, eval_only=True)
    model = tr.engine.module.eval()
    ids, pads = tr.task.class_texts()
    names = c.color_classes.read_text().split()
    assert len(ids) == len(names) and all(i.shape[0] == 7 for i in ids)
    tok = tr.task.tokenizer
    first = ids[0][0][~pads[0][0]].tolist()
    assert first[1:-1] == tok.encode(CLIP_IMAGENET_SELECTED[0].format(names[0]))
    got = zero_shot_class_embeddings(model, ids, pads)
    with torch.no_grad():
        for k, name in enumerate(names):
            feats = []
            for template in CLIP_IMAGENET_SELECTED:
                t = torch.tensor([[BOS_ID, *tok.encode(template.format(name)), EOS_ID]])
                feats.append(F.normalize(model.language_head(model.beit3(text_ids=t).hidden[:, 0]), dim=-1)[0])
            want = F.normalize(torch.stack(feats).mean(0), dim=-1)
            torch.testing.assert_close(got[k], want, atol=1e-5, rtol=1e-4)
    res = main(["zeroshot", "--eval", *args, f"run.output_dir={tmp_path / 'zs'}"])["final"]
    assert res["num_examples"] == 60 and 0.0 <= res["top1"] <= 1.0
