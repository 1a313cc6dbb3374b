"""Official task checkpoints into our task models: max abs difference of the task outputs.

For each task a random-weight file in the official layout (torchscale ``BEiT3`` under ``beit3.``
plus the ``modeling_finetune.py`` head, ``testing/official_task_heads.py``) is loaded strictly
(``model.strict_load``) into our task model; the table gives the max abs difference between our
output and the direct computation (torchscale forward + the head on the file's tensors), fp32,
and the output scale it is relative to.

    python bench/task_parity.py --presets tiny base --depth 2
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


import torch

from beit3.finetune.heads import CaptioningModel, ImageClassifier, NLVR2Model, RetrievalModel, VQAModel
from beit3.finetune.train import load_weights, require_exact
from beit3.model import get_config
from beit3.testing.official_task_heads import official_task_file, official_task_output

TASKS = ("classification", "vqa", "nlvr2", "retrieval", "captioning")
LABELS = {"classification": 1000, "vqa": 3129}


def _ours(task: str, model, x: dict):
    if task == "classification":
        return model(x["images"])
    if task == "vqa":
        return model(x["images"], x["text"], x["pad"])
    if task == "nlvr2":
        return model(x["images"], x["images2"], x["text"], x["pad"])
    if task == "retrieval":
        img, txt, _ = model(images=x["images"], text_ids=x["text"], text_padding_mask=x["pad"])
        return torch.cat([img, txt])
    return model(x["images"], x["text"], None, x["masked"])


def measure(preset: str, task: str, depth: int, batch: int, text_len: int, folder: Path) -> tuple[float, float]:
    over = {"normalize_output": task not in ("classification", "vqa")}
    if depth:
        over["depth"] = depth
    cfg = get_config(preset, **over)
    path = folder / f"{preset}_{task}.pth"
    official, sd = official_task_file(path, cfg, task, seed=0, num_labels=LABELS.get(task, 0))
    model = {"classification": lambda: ImageClassifier(cfg, LABELS["classification"]),
             "vqa": lambda: VQAModel(cfg, LABELS["vqa"]), "nlvr2": lambda: NLVR2Model(cfg),
             "retrieval": lambda: RetrievalModel(cfg), "captioning": lambda: CaptioningModel(cfg)}[task]()
    require_exact(load_weights(model, str(path), cfg), str(path))
    path.unlink()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g)
    text = torch.randint(4, cfg.vocab_size, (batch, text_len), generator=g)
    pad = torch.zeros(batch, text_len, dtype=torch.bool)
    pad[-1, text_len // 2:] = True
    masked = torch.zeros_like(text, dtype=torch.bool)
    masked[:, 1::3] = True
    x = dict(images=images, images2=torch.randn(images.shape, generator=g), text=text, pad=pad, masked=masked)
    want = official_task_output(task, official, sd, **x)
    want = torch.cat(want) if isinstance(want, tuple) else want
    with torch.no_grad():
        got = _ours(task, model.eval(), x)
    return (got - want).abs().max().item(), want.abs().max().item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "base"])
    ap.add_argument("--depth", type=int, default=2, help="layers (0: the preset's); widths stay the preset's")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--text-len", type=int, default=16)
    args = ap.parse_args(argv)
    print(f"| preset | depth | {' | '.join(TASKS)} | seconds |")
    print("|---" * (len(TASKS) + 3) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            t0 = time.time()
            cells = [measure(preset, t, args.depth, args.batch, args.text_len, Path(tmp)) for t in TASKS]
            depth = args.depth or get_config(preset).depth
            print(f"| {preset} | {depth} | " + " | ".join(f"{d:.1e} (of {s:.2f})" for d, s in cells)
                  + f" | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
