"""The end-to-end demo behind ``make demo``: every stage of the system on small real data, on CPU.

    python -m beit3.pretrain.demo --out runs/demo [--nproc 2] [--steps 240]

1. demo data: scikit-learn digits -> image and image-caption shards, stdlib docstrings -> a
   SentencePiece model and text shards (``pretrain.demo_data``);
2. a frozen image tokenizer: a tiny VQ-KD trained briefly (``pretrain.train_tokenizer``) to
   regress a teacher's patch features. No teacher weights can be downloaded here, so the demo's
   teacher is a randomly initialized CLIP-layout ViT (saved to ``tokenizer/teacher.pt``); real
   runs point ``teacher.path`` at CLIP ViT-B/16;
3. pretraining of the tiny preset with DeepSpeed ZeRO-3 on ``--nproc`` CPU ranks, stopped at half
   the steps (a sharded checkpoint) and resumed by a second launch to the end (``pretrain.train``);
4. export of consolidated weights (safetensors + the official ``.pth`` layout; ``pretrain.export``);
5. does pretraining help: the same short image-classification fine-tune on digits never seen in
   pretraining, from the exported weights and from random initialization (``finetune.train``),
   evaluated on other unseen digits; and, with no fine-tuning at all, zero-shot digit naming by
   the pretraining MLM head (``masked_caption_zero_shot``).

Each stage runs as its own process with the same command a user would type; the commands and
their logs are kept under ``--out``. A finished stage is skipped on a rerun.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from beit3.pretrain.engine import free_port
from beit3.pretrain.telemetry import get_logger

logger = get_logger(__name__)
REPO = Path(__file__).resolve().parent.parent


class Stages:
    """Runs the demo's commands one after another, logging each to ``out/logs``."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.times: dict[str, float] = {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def run(self, name: str, cmd: list[str]) -> None:
        log = self.logs / f"{name}.log"
        (self.logs / f"{name}.cmd").write_text(shlex.join(cmd) + "\n")
        logger.info("[%s] %s  (log: %s)", name, shlex.join(cmd[:6]) + " ...", log)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        self.times[name] = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
            raise SystemExit(f"demo stage {name!r} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
        logger.info("[%s] done in %.0f s", name, self.times[name])


def _last_metrics(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[-1] if rows else {}


def masked_caption_zero_shot(export_dir: Path, spm_path: str, folders: list[Path], pretrained: bool = True,
                             template: str = "a handwritten digit {}") -> float:
    """Top-1 of naming unseen digits with the MLM head alone: the fused encoder reads the image and
    ``template`` with the digit's name masked; the class whose name tokens get the highest
    log-likelihood wins. ``pretrained=False``: the same model at random initialization."""
    import numpy as np
    import torch
    from PIL import Image

    from beit3.data_pipeline import TextTokenizer
    from beit3.data_pipeline.demo_data import NAMES
    from beit3.model import BEiT3Config, BEiT3ForPretraining

    tok = TextTokenizer(spm_path)
    torch.manual_seed(0)
    model = BEiT3ForPretraining(BEiT3Config.from_dict(json.loads((export_dir / "config.json").read_text())["model"]))
    if pretrained:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(export_dir / "model.safetensors")))
    model.eval()
    files = sorted(f for folder in folders for f in folder.glob("*/*.png"))
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                          for f in files]) / 127.5 - 1.0  # [B, 3, H, W] in [-1, 1], as the loader normalizes
    labels = torch.tensor([NAMES.index(f.parent.name) for f in files])
    prefix = len(tok.encode(template.format("").rstrip()))
    scores = []
    for name in NAMES:  # log p(name tokens | image, masked caption)
        ids = torch.tensor(tok.encode_with_specials(template.format(name), 64))
        pos = torch.arange(1 + prefix, len(ids) - 1)
        masked = torch.zeros(len(ids), dtype=torch.bool)
        masked[pos] = True
        B = len(files)
        with torch.no_grad():
            out = model(images=images, text_ids=ids.masked_fill(masked, tok.mask_id).expand(B, -1),
                        text_padding_mask=torch.zeros(B, len(ids), dtype=torch.bool), text_mask=masked.expand(B, -1))
        logp = out.mlm_logits.float().log_softmax(-1).view(B, len(pos), -1)  # [B, T, V]
        scores.append(logp.gather(-1, ids[pos].view(1, -1, 1).expand(B, -1, 1)).squeeze(-1).sum(-1))
    return float((torch.stack(scores, 1).argmax(1) == labels).float().mean())


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m beit3.pretrain.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="everything goes here (default runs/demo)")
    ap.add_argument("--nproc", type=int, default=2, help="CPU ranks for pretraining (default 2)")
    ap.add_argument("--steps", type=int, default=400, help="pretraining steps (default 400)")
    ap.add_argument("--tokenizer-steps", type=int, default=150, help="VQ-KD training steps (default 150)")
    ap.add_argument("--finetune-steps", type=int, default=300, help="classification fine-tune steps (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the demo stops at half and resumes)")
    out = Path(args.out).resolve()
    st = Stages(out)
    py = sys.executable
    t_start = time.perf_counter()

    # 1. data (in-process: it calls the shard writers' main() functions)
    from beit3.pretrain.demo_data import build_demo_data

    t0 = time.perf_counter()
    data = build_demo_data(out / "data")
    st.times["data"] = time.perf_counter() - t0
    from beit3.data_pipeline import TextTokenizer

    vocab = TextTokenizer(data.spm_path).vocab_size

    # 2. frozen image tokenizer
    tok_dir = out / "tokenizer"
    tokenizer = tok_dir / "tokenizer.pt"
    if not tokenizer.is_file():
        import torch

        from beit3.model.vqkd import ClipVisionTeacher

        tok_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(args.seed)
        torch.save(ClipVisionTeacher(32, 8, 64, 2, 1, 64).state_dict(), tok_dir / "teacher.pt")
        st.run("tokenizer", [py, "-m", "beit3.pretrain.train_tokenizer", "preset=tiny",
                             f"teacher.path={tok_dir / 'teacher.pt'}", f"data.image_shards=[{data.image_shards}]",
                             "data.img_size=32", "data.patch_size=8", "data.num_workers=1",
                             f"run.out_dir={tok_dir}", "run.batch_size=64", "run.deepspeed_config=vqkd_zero1_fp32.json",
                             f"optim.total_steps={args.tokenizer_steps}", "optim.warmup_steps=10", "optim.lr=1e-3",
                             "run.log_every=25", f"run.save_every={args.tokenizer_steps}",
                             "--metrics-out", str(tok_dir / "metrics.json")])

    # 3. pretraining: stop at half (checkpoint), resume to the end
    run_dir = out / "pretrain"
    common = ["--config", str(REPO / "pretrain/configs/tiny_demo.yaml"),
              "--deepspeed_config", "zero3_bf16.json",
              f"data.image_shards={data.image_shards}", f"data.text_shards={data.text_shards}",
              f"data.pair_shards={data.pair_shards}", f"data.spm_path={data.spm_path}",
              f"model.overrides.vocab_size={vocab}", f"targets.tokenizer_path={tokenizer}",
              f"run.output_dir={run_dir}", f"run.seed={args.seed}", "run.log_every=20",
              f"run.save_every={args.steps}", f"optim.total_steps={args.steps}"]
    deepspeed = [str(Path(py).parent / "deepspeed"), "--num_gpus", str(args.nproc)]
    half = args.steps // 2
    metrics = run_dir / "metrics.jsonl"
    if not (metrics.is_file() and _last_metrics(metrics).get("step") == args.steps):
        st.run("pretrain_part1", deepspeed + ["--master_port", str(free_port()), "pretrain/train.py", *common,
                                              f"run.max_steps={half}"])
        st.run("pretrain_part2_resumed", deepspeed + ["--master_port", str(free_port()), "pretrain/train.py",
                                                      *common, "run.resume=auto"])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]

    # 4. export
    export = out / "export"
    st.run("export", [py, "-m", "beit3.pretrain.export", str(run_dir / "checkpoints"), "--out", str(export),
                      "--official"])

    # 5. pretrained vs random initialization, the same short fine-tune on unseen digits
    from beit3.finetune.convert_data import convert_image_folder

    ft = out / "finetune"
    ft.mkdir(parents=True, exist_ok=True)
    classes = ft / "classes.txt"
    convert_image_folder(data.finetune_train, out, ft / "train.jsonl", classes)
    convert_image_folder(data.finetune_test, out, ft / "test.jsonl", classes)
    results = {}
    for name, weights in (("pretrained", [f"model.pretrained={export / 'model.safetensors'}"]), ("random_init", [])):
        st.run(f"finetune_{name}", [
            py, "-m", "beit3.finetune.train", "classification", "model.preset=tiny",
            f"model.overrides.vocab_size={vocab}", "model.overrides.max_text_positions=66", *weights,
            f"data.data_root={out}", f"data.train_index={ft / 'train.jsonl'}", f"data.eval_index={ft / 'test.jsonl'}",
            f"data.classes={classes}", "data.num_classes=10", "data.batch_size=32", "data.num_workers=1",
            "data.crop_scale=[0.8,1.0]", f"train.max_steps={args.finetune_steps}", "train.layer_decay=0.9",
            "train.deepspeed_config=finetune_cpu_fp32.json", f"train.output_dir={ft / name}",
            f"train.seed={args.seed}", "train.eval_every_epochs=1000", "optim.lr=1e-3", "optim.warmup_steps=20"])
        results[name] = json.loads((ft / name / "metrics.json").read_text())["final"]

    held_out = [data.finetune_train, data.finetune_test]
    zero_shot = {name: masked_caption_zero_shot(export, data.spm_path, held_out, pretrained=name == "pretrained")
                 for name in ("pretrained", "random_init")}
    summary = {
        "pretrain": {"steps": rows[-1]["step"], "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
                     "resumed_at": half, "ranks": args.nproc},
        "heldout_classification": results,
        "heldout_zero_shot_naming_top1": zero_shot,
        "seconds": {**{k: round(v, 1) for k, v in st.times.items()}, "total": round(time.perf_counter() - t_start, 1)},
        "paths": {"data": str(out / "data"), "spm": data.spm_path, "tokenizer": str(tokenizer),
                  "checkpoints": str(run_dir / "checkpoints"), "metrics": str(metrics),
                  "tensorboard": str(run_dir / "tensorboard"), "export": str(export), "finetune": str(ft),
                  "logs": str(st.logs)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary)
    return summary


def _print_summary(s: dict) -> None:
    p = s["pretrain"]
    print(f"\npretraining: {p['steps']} steps on {p['ranks']} ranks (killed at {p['resumed_at']} and resumed), "
          f"loss {p['first_loss']:.3f} -> {p['last_loss']:.3f}")
    print("held-out digit classification after the same fine-tune:")
    for name, m in s["heldout_classification"].items():
        print(f"  {name:12s} " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, (int, float))))
    print("held-out digits named zero-shot by the MLM head (no fine-tuning; chance 0.1):")
    for name, acc in s["heldout_zero_shot_naming_top1"].items():
        print(f"  {name:12s} top1 {acc:.4f}")
    print("where everything is:")
    for k, v in s["paths"].items():
        print(f"  {k:12s} {v}")
    print(f"total {s['seconds']['total']:.0f} s  ({', '.join(f'{k} {v:.0f}s' for k, v in s['seconds'].items())})")


if __name__ == "__main__":
    main(sys.argv[1:])
