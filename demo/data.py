"""Small real pretraining data for the demo and the tests, built with the project's own tools.

scikit-learn's digits (real handwritten images) become image shards (ImageFolder -> shards) and
image-caption pair shards (TSV -> shards); standard-library docstrings (real English) become a
SentencePiece model and text shards. The digits after ``num_train`` are never seen in
pretraining: they are split (alternately) into two ImageFolders, ``finetune_train`` and
``finetune_test``, for the "does pretraining help" evaluation.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from beit3.data_pipeline import train_spm, write_images, write_pairs, write_texts
from beit3.demo import digits as demo_data

logger = logging.getLogger(__name__)


@dataclass
class DemoData:
    root: Path
    image_shards: str
    text_shards: str
    pair_shards: str
    spm_path: str
    train_images: Path  # ImageFolder of the pretraining split
    finetune_train: Path  # ImageFolder of held-out digits (never seen in pretraining): fine-tuning set
    finetune_test: Path  # ImageFolder of the other held-out digits: evaluation set


def build_demo_data(root: str | Path, img_size: int = 32, num_train: int = 1500, spm_vocab: int = 1000,
                    samples_per_shard: int = 250, max_docs: int = 300) -> DemoData:
    """Write everything under ``root`` (reused when already complete)."""
    root = Path(root)
    done = root / "DONE"
    paths = DemoData(root=root, image_shards=str(root / "shards/images/manifest.json"),
                     text_shards=str(root / "shards/texts/manifest.json"),
                     pair_shards=str(root / "shards/pairs/manifest.json"),
                     spm_path=str(root / "spm/demo.model"), train_images=root / "raw/train",
                     finetune_train=root / "raw/finetune_train", finetune_test=root / "raw/finetune_test")
    if done.is_file():
        return paths
    shutil.rmtree(root, ignore_errors=True)
    raw = root / "raw"
    imgs, labels = demo_data.digits_images(img_size)
    for k in range(len(imgs)):
        split = "train" if k < num_train else ("finetune_train", "finetune_test")[(k - num_train) % 2]
        d = raw / split / demo_data.NAMES[int(labels[k])]
        d.mkdir(parents=True, exist_ok=True)
        imgs[k].save(d / f"{k:05d}.png")
    pairs_tsv = demo_data.write_digits_pairs_tsv(raw / "pairs", img_size, limit=num_train, quality=92)
    corpus = demo_data.write_corpus(raw / "corpus.txt", max_docs=max_docs)
    captions = raw / "captions.txt"
    rows = pairs_tsv.read_text(encoding="utf-8").splitlines()[1:]
    captions.write_text("\n".join(r.split("\t")[1] for r in rows) + "\n", encoding="utf-8")

    (root / "spm").mkdir(parents=True)
    train_spm.main([str(corpus), str(captions), "--out-prefix", str(root / "spm/demo"),
                          "--vocab-size", str(spm_vocab)])
    n = str(samples_per_shard)
    write_images.main([str(raw / "train"), str(root / "shards/images"), "--maxcount", n, "-q"])
    write_pairs.main([str(pairs_tsv), str(root / "shards/pairs"), "--maxcount", n, "-q"])
    write_texts.main([str(corpus), str(root / "shards/texts"), "--spm", paths.spm_path, "--maxcount", n, "-q"])
    done.write_text("ok\n")
    logger.info("demo data under %s", root)
    return paths


__all__ = ["DemoData", "build_demo_data"]
