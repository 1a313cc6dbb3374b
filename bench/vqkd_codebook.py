"""Dead-code guard of VQ-KD training: codebook usage with and without it, in the same run.

    .venv/bin/python bench/vqkd_codebook.py [--steps 60] [--num-codes 256] [--images 960]

Trains the ``tiny`` tokenizer three times on the same real images (scikit-learn digits,
upsampled to 32 px RGB) with the same small randomly initialised CLIP-layout teacher and a real
DeepSpeed engine (1 CPU rank), through ``beit3.pretrain.train_vqkd.train``:

- baseline: random codebook init, no re-seeding (``model.kmeans_init=false codebook.reseed_dead=false``);
- k-means init on the first batch only;
- k-means init + re-seeding codes unused for ``--dead-after`` steps (the default guard).

Prints, per run, the last logged codes used in the last ``--window`` steps, perplexity,
reconstruction cosine and re-seeded codes, with ratios against the baseline.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from beit3.data_pipeline import write_images
from beit3.demo.digits import write_digits_image_folder
from beit3.model.vqkd import ClipVisionTeacher
from beit3.pretrain import train_vqkd
from beit3.model.config_io import load_config

RUNS = (("baseline: random init, no re-seed", ["model.kmeans_init=false", "codebook.reseed_dead=false"]),
        ("k-means init", ["model.kmeans_init=true", "codebook.reseed_dead=false"]),
        ("k-means init + re-seed dead codes", ["model.kmeans_init=true", "codebook.reseed_dead=true"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--num-codes", type=int, default=256)
    p.add_argument("--images", type=int, default=960)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--window", type=int, default=10, help="usage window (steps)")
    p.add_argument("--dead-after", type=int, default=10, help="re-seed codes unused for this many steps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_digits_image_folder(root / "digits", size=32, limit=args.images)
        write_images.main([str(root / "digits"), str(root / "shards"), "-q", "--maxcount", "500"])
        torch.manual_seed(0)
        torch.save(ClipVisionTeacher(32, 8, 64, 2, 1, 64).state_dict(), root / "teacher.pt")
        for k, (name, extra) in enumerate(RUNS):
            argv_k = ["preset=tiny", f"model.num_codes={args.num_codes}", f"teacher.path={root / 'teacher.pt'}",
                      f"data.image_shards=[{root / 'shards' / 'manifest.json'}]", "data.img_size=32",
                      "data.patch_size=8", "data.num_workers=0", f"run.output_dir={root / f'run{k}'}",
                      f"run.batch_size={args.batch}", "run.deepspeed_config=zero1_fp32.json",
                      f"optim.total_steps={args.steps}", "optim.warmup_steps=3", "optim.lr=1e-3",
                      f"run.log_every={args.steps}", f"run.save_every={args.steps}",
                      f"codebook.usage_window={args.window}", f"codebook.dead_after_steps={args.dead_after}", *extra]
            out = train_vqkd.train(load_config(train_vqkd.TrainVQKDConfig, None, argv_k))
            results.append((name, out["history"][-1]))
    base = results[0][1]
    print(f"\ntiny VQ-KD, {args.num_codes} codes, {args.steps} steps x {args.batch} images (16 patches each), "
          f"digits 32 px, usage window {args.window} steps, dead after {args.dead_after}; torch {torch.__version__}, "
          f"python {sys.version.split()[0]}\n")
    print("| run | codes used (last window) | vs baseline | perplexity | vs baseline | reconstruction cosine | re-seeded |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in results:
        print(f"| {name} | {m['codes_used']} / {args.num_codes} | {m['codes_used'] / max(1, base['codes_used']):.2f} "
              f"| {m['perplexity']:.1f} | {m['perplexity'] / max(1e-9, base['perplexity']):.2f} | {m['rec_cos']:.3f} "
              f"| {m['reseeded']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
