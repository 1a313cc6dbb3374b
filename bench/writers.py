"""Shard writers and offline-code precompute with ``--workers 1`` and ``--workers 2``, and the
model of N workers.

    .venv/bin/python bench/writers.py [--images 448] [--text-copies 8]

Inputs: an ImageFolder of JPEGs like img2dataset output (photographs, long side 256-1024 px), the
same images as a pair TSV, standard-library docstrings as text (``--text-copies`` copies of the
corpus file), and ``tiny`` VQ-KD codes (2 views) of the image shards. Each command runs in this
process (``main(argv)``); its worker processes are forked children. Per run: wall time, CPU time of
this process (the writing process: tar output, and for ``targets`` the tokenizer forward) and of the
workers (reading + verifying images, tokenizing, decoding + cropping). The model of N workers on N+1
free cores: items/s = min(N / worker CPU-s per item, 1 / writer CPU-s per item), from the 2-worker
run; with 1 worker the item work runs in the writing process itself. Wall figures on a shared
machine are loaded by other jobs; the CPU figures are not.
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from beit3.data_pipeline import write_images, write_pairs, write_texts
from beit3.demo.digits import NAMES, caption, photo_jpegs, write_corpus
from beit3.data_pipeline.tokenizer import TextTokenizer
from beit3.pretrain import targets
from beit3.testing.tokenizers import random_codebook_tokenizer


def inputs(root: Path, n_images: int, copies: int, text_copies: int) -> dict[str, Path]:
    (root / "pairs").mkdir(parents=True)
    lines = []
    jpegs = photo_jpegs(n_images)
    for k in range(n_images * copies):
        d = root / "folder" / NAMES[k % 10]
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{k:05d}.jpg").write_bytes(jpegs[k % n_images])
        lines.append(f"{d / f'{k:05d}.jpg'}\t{caption(k % 10, k)}")
    (root / "pairs" / "pairs.tsv").write_text("\n".join(lines) + "\n")
    corpus = write_corpus(root / "corpus.txt", 400)
    TextTokenizer.train([str(corpus)], root / "spm", vocab_size=2000)
    random_codebook_tokenizer(root / "tokenizer.pt")
    return {"folder": root / "folder", "tsv": root / "pairs" / "pairs.tsv", "corpus": corpus,
            "spm": root / "spm.model", "tok": root / "tokenizer.pt", "text_copies": text_copies}


def measure(run: Callable[[], int]) -> tuple[float, float, float]:
    """(wall s, CPU s of this process, CPU s of reaped children) of one run."""
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0, p0 = time.perf_counter(), time.process_time()
    assert run() == 0
    t1, p1 = time.perf_counter(), time.process_time()
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return t1 - t0, p1 - p0, (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)


def commands(paths: dict, out: Path) -> dict[str, tuple[Callable[[int, int], int], str]]:
    """name -> (run(N workers, repetition k), item unit); every run writes a new folder."""
    texts = [str(paths["corpus"])] * paths["text_copies"]

    def images(n: int, k: int) -> int:
        return write_images.main([str(paths["folder"]), str(out / f"img{n}-{k}"), "--maxcount", "64",
                                  "--workers", str(n), "-q"])

    def pairs(n: int, k: int) -> int:
        return write_pairs.main([str(paths["tsv"]), str(out / f"pair{n}-{k}"), "--maxcount", "64",
                                 "--workers", str(n), "-q"])

    def texts_(n: int, k: int) -> int:
        return write_texts.main([*texts, str(out / f"txt{n}-{k}"), "--spm", str(paths["spm"]), "--workers", str(n),
                                 "-q"])

    def codes(n: int, k: int) -> int:
        return targets.main(["--tokenizer", str(paths["tok"]), "--shards", str(out / "img1-0" / "manifest.json"),
                             "--out", str(out / f"codes{n}-{k}"), "--views", "2", "--device", "cpu",
                             "--workers", str(n), "-q"])

    return {"write_images": (images, "images"), "write_pairs": (pairs, "pairs"), "write_texts": (texts_, "documents"),
            "targets (tiny VQ-KD, 2 views, CPU)": (codes, "images")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=448, help="distinct JPEGs")
    p.add_argument("--copies", type=int, default=4, help="files per distinct JPEG")
    p.add_argument("--text-copies", type=int, default=16, help="copies of the corpus file")
    p.add_argument("--repeat", type=int, default=2, help="best of N wall times")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = inputs(root, args.images, args.copies, args.text_copies)
        n_docs = sum(1 for _ in write_texts.iter_documents(paths["corpus"], "blank", Counter()))
        n_img = args.images * args.copies
        items = {"images": n_img, "pairs": n_img, "documents": n_docs * args.text_copies}
        rows = []
        for name, (run, unit) in commands(paths, root / "out").items():
            one = min((measure(lambda: run(1, k)) for k in range(args.repeat)), key=lambda m: m[0])
            two = min((measure(lambda: run(2, k)) for k in range(args.repeat)), key=lambda m: m[0])
            rows.append((name, unit, items[unit], one, two))
        print(f"\n{n_img} JPEG files ({args.images} distinct, long side 256-1024 px), {items['documents']} "
              f"documents; best of {args.repeat} wall times; torch {torch.__version__}, python "
              f"{sys.version.split()[0]}; wall on a shared 2-core machine (load from other jobs)\n")
        print("| command | items | 1 worker: items/s wall (CPU ms/item) | 2 workers: items/s wall | wall 2 / 1 "
              "| 2 workers, CPU ms/item: writing process / workers | model items/s, N = 2, 4, 8, 16 workers |")
        print("|---|---|---:|---:|---:|---:|---|")
        for name, unit, n, one, two in rows:
            writer, worker = two[1] / n, two[2] / n
            model = [min(k / worker, 1 / writer) for k in (2, 4, 8, 16)]
            print(f"| {name} | {n} {unit} | {n / one[0]:.0f} ({(one[1] + one[2]) / n * 1e3:.2f}) | {n / two[0]:.0f} "
                  f"| {one[0] / two[0]:.2f} | {writer * 1e3:.2f} / {worker * 1e3:.2f} "
                  f"| {', '.join(f'{m:.0f}' for m in model)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
