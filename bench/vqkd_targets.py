"""Visual-token targets: what precomputed (offline) codes save per training step against the
frozen tokenizer running online, for the ``tiny`` and ``base`` VQ-KD presets, in the same run.

    .venv/bin/python bench/vqkd_targets.py [--presets tiny base] [--batch 32 8] [--steps 3]

Per preset: image shards from scikit-learn digits (upsampled JPEGs), a tokenizer with random
weights and an initialised codebook (speed does not depend on the weights), offline codes
written by ``precompute_codes`` (K=2 views). Then, per step of ``batch`` images on one rank:

- online: ``ImageLoader`` renders the tokenizer view; ``VisualTokenTargets`` runs the tokenizer
  and keeps the codes at the masked patches;
- offline: ``ImageLoader(offline_codes=True)`` reads ``codes.npy`` and picks a stored view;
  ``labels_from_codes`` indexes them.

Timings are process CPU time on one thread (the machine is shared), median over ``steps``
steps after one warm-up step. On a GPU the tokenizer forward runs on the device, so the saving
there is the device time of that forward; this script measures the CPU case only.
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from beit3.data_pipeline import DataConfig, ImageLoader, ShardWriter
from beit3.demo.digits import digits_images
from beit3.model.vqkd import VQKD, get_vqkd_config
from beit3.pretrain.targets import VisualTokenTargets, precompute_codes


def make_shards(root: Path, n: int, size: int) -> str:
    imgs, labels = digits_images(size=size, limit=n)
    with ShardWriter(root, "images", "image", maxcount=64) as w:
        for k, (im, y) in enumerate(zip(imgs, labels)):
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            w.write({"__key__": f"{k:06d}", "jpg": buf.getvalue(), "cls": int(y)})
    return str(root / "manifest.json")


def tokenizer(preset: str) -> VQKD:
    torch.manual_seed(0)
    m = VQKD(get_vqkd_config(preset))
    with torch.no_grad():
        m.quantize.embedding.weight.copy_(F.normalize(torch.randn_like(m.quantize.codebook), dim=-1))
        m.quantize.embedding.initted.fill_(1.0)
    return m


def cpu_ms(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn()
    return (time.process_time() - t0) * 1e3, out


def run_mode(cfg: DataConfig, targets: VisualTokenTargets, batch: int, steps: int) -> tuple[float, float]:
    """(median loader ms/step, median target ms/step)."""
    it = iter(ImageLoader(cfg, 0, 1, batch_size=batch, with_mask=True))
    load, tgt = [], []
    for s in range(steps + 1):
        t_load, b = cpu_ms(lambda: next(it))
        t_tgt, labels = cpu_ms(lambda: targets.for_batch(b))
        assert labels.numel() == int(b["image_mask"].sum())
        if s:  # the first step builds the streams / warms up
            load.append(t_load)
            tgt.append(t_tgt)
    return statistics.median(load), statistics.median(tgt)


def bench_preset(preset: str, batch: int, steps: int, root: Path) -> dict[str, float]:
    tok = tokenizer(preset)
    c = tok.config
    n = max(2 * batch, 16)
    shards = make_shards(root / preset / "img", n, size=c.img_size + c.img_size // 4)
    t_off, summary = cpu_ms(lambda: precompute_codes(tok, [shards], str(root / preset / "coded"), views=2,
                                                     batch_size=batch, progress=False))
    targets = VisualTokenTargets(tok)
    base = dict(img_size=c.img_size, patch_size=c.patch_size, images=batch, texts=0, pairs=0, num_workers=0)
    on = run_mode(DataConfig(image_shards=[shards], **base), targets, batch, steps)
    off = run_mode(DataConfig(image_shards=[str(root / preset / "coded" / "manifest.json")], offline_codes=True,
                              **base), targets, batch, steps)
    return {"batch": batch, "online_load": on[0], "online_tgt": on[1], "offline_load": off[0], "offline_tgt": off[1],
            "precompute_ms_per_view": t_off / (summary["coded"] * 2), "params_m": sum(p.numel() for p in tok.parameters()) / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "base"])
    p.add_argument("--batch", nargs="+", type=int, default=[32, 8], help="images per step, one per preset")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up)")
    args = p.parse_args(argv)
    if len(args.batch) != len(args.presets):
        p.error("give one --batch per preset")
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset, batch in zip(args.presets, args.batch):
            rows.append((preset, bench_preset(preset, batch, args.steps, Path(tmp))))
    print(f"\n1 thread, process CPU time, median of {args.steps} steps after a warm-up; torch {torch.__version__}, "
          f"python {sys.version.split()[0]}; no GPU on this machine\n")
    print("| preset | tokenizer params | images/step | online: loader + tokenizer ms/step | "
          "offline: loader + labels ms/step | saved ms/step | offline / online | precompute ms/view |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for preset, r in rows:
        on = r["online_load"] + r["online_tgt"]
        off = r["offline_load"] + r["offline_tgt"]
        print(f"| {preset} | {r['params_m']:.1f}M | {r['batch']} | {r['online_load']:.1f} + {r['online_tgt']:.1f} = {on:.1f} "
              f"| {r['offline_load']:.1f} + {r['offline_tgt']:.2f} = {off:.1f} | {on - off:.1f} | {off / on:.2f} "
              f"| {r['precompute_ms_per_view']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
