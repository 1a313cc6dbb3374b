"""A small real dataset for tests and the CPU demo: scikit-learn's handwritten digits.

``make_digits_corpus(root, n)`` writes the 8x8 digits upsampled to 32x32 and drawn in one of
three colours (so that a from-scratch tiny model learns something in a few dozen CPU steps:
colour is easy, the digit itself is hard), then the RAW
annotation formats the converters read: a Karpathy split JSON (captions), VQAv2 questions +
annotations (colour / digit / parity questions), NLVR2 JSONL (statements about the left or
right image of a pair: the text picks the image, the image decides true/false), an
image folder (classification), and a SentencePiece model trained on all the text. Every
fine-tuning task then runs from its converted index files, as on the real datasets.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from beit3.demo.digits import render_digit

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLORS = {"red": (1.0, 0.15, 0.15), "green": (0.15, 1.0, 0.15), "blue": (0.2, 0.3, 1.0)}
# the colour comes second in every caption: a captioner conditions on the image from its second word
CAPTIONS = ["a {c} digit {w}", "a {c} handwritten {w}", "the {c} number {w}", "a {c} {w} written by hand"]


@dataclass
class DigitsCorpus:
    """Paths of a generated corpus (all relative image paths are under ``root``)."""

    root: Path
    spm: Path
    karpathy: Path
    vqa_train_questions: Path
    vqa_train_annotations: Path
    vqa_val_questions: Path
    vqa_val_annotations: Path
    nlvr2_train: Path
    nlvr2_dev: Path
    classes: Path
    color_classes: Path
    labels: list[int]
    colors: list[str]


def _answers(question: str, digit: int, color: str, rng: random.Random) -> list[str]:
    if question.startswith("what color"):
        truth = color
    elif question.startswith("what"):
        truth = WORDS[digit]
    elif "even" in question:
        truth = "yes" if digit % 2 == 0 else "no"
    else:
        truth = "yes" if digit > 5 else "no"
    # 10 annotators, mostly agreeing (soft scores exercise the 0.3 .. 1.0 table)
    wrong = {"yes": "no", "no": "yes"}.get(truth, WORDS[(digit + 1) % 10])
    k = rng.choice([10, 9, 8, 7])
    return [truth] * k + [wrong] * (10 - k)


def make_digits_corpus(root: str | Path, n: int = 240, seed: int = 0, spm_extra: int = 0) -> DigitsCorpus:
    """Write ``n`` coloured digit images (train = first 3/4, the rest val/test) and the raw
    annotation files; train a word-level SentencePiece model on the texts."""
    from sklearn.datasets import load_digits

    from beit3.data_pipeline.tokenizer import TextTokenizer

    root = Path(root)
    rng = random.Random(seed)
    digits = load_digits()
    images, labels = digits.images[:n], [int(t) for t in digits.target[:n]]
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "train2014").mkdir(exist_ok=True)
    (root / "val2014").mkdir(exist_ok=True)
    n_train = (3 * n) // 4
    colors = [rng.choice(list(COLORS)) for _ in labels]
    for i, (img, lab) in enumerate(zip(images, labels)):
        pil = render_digit(img, 32, np.asarray(COLORS[colors[i]], dtype=np.float32))
        pil.save(root / "images" / f"digit_{i:05d}.png")
        coco_split = "train2014" if i < n_train else "val2014"
        pil.save(root / coco_split / f"COCO_{coco_split}_{i:012d}.png")
        cls_dir = root / "classes" / ("train" if i < n_train else "val") / WORDS[lab]
        cls_dir.mkdir(parents=True, exist_ok=True)
        pil.save(cls_dir / f"{i:05d}.png")
        color_dir = root / "colors" / ("train" if i < n_train else "val") / colors[i]
        color_dir.mkdir(parents=True, exist_ok=True)
        pil.save(color_dir / f"{i:05d}.png")
    texts: list[str] = []
    # Karpathy captions
    kimgs = []
    for i, lab in enumerate(labels):
        split = "train" if i < n_train else ("val" if i % 2 else "test")
        sents = [{"raw": c.format(w=WORDS[lab], c=colors[i])} for c in CAPTIONS]
        texts += [s["raw"] for s in sents]
        kimgs.append({"filepath": "images", "filename": f"digit_{i:05d}.png", "split": split, "cocoid": i,
                      "sentences": sents})
    karpathy = root / "dataset_digits.json"
    karpathy.write_text(json.dumps({"dataset": "digits", "images": kimgs}))
    # VQAv2
    questions = ["what color is the digit?", "what digit is this?", "is this digit even?"]
    vqa_paths = []
    for split, ids in (("train2014", range(n_train)), ("val2014", range(n_train, n))):
        qs, anns = [], []
        for i in ids:
            for k, q in enumerate(questions):
                qid = i * 10 + k
                qs.append({"image_id": i, "question": q, "question_id": qid})
                answers = _answers(q, labels[i], colors[i], rng)
                anns.append({"question_id": qid, "image_id": i, "multiple_choice_answer": answers[0],
                             "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]})
        texts += questions
        qp, ap = root / f"vqa_{split}_questions.json", root / f"vqa_{split}_annotations.json"
        qp.write_text(json.dumps({"questions": qs}))
        ap.write_text(json.dumps({"annotations": anns}))
        vqa_paths += [qp, ap]
    # NLVR2: pairs of images; statements true or false
    nlvr_paths = []
    for split, lo, hi in (("train", 0, n_train), ("dev", n_train, n)):
        folder = root / "nlvr2" / split
        folder.mkdir(parents=True, exist_ok=True)
        lines = []
        for j in range(hi - lo):
            # "the digit in the {side} image is red": the side named by the text decides which
            # image the label depends on (true for half of the examples)
            side = rng.choice(["left", "right"])
            truth = rng.random() < 0.5
            pool = [i for i in range(lo, hi) if (colors[i] == "red") == truth] or list(range(lo, hi))
            a, b = lo + rng.randrange(hi - lo), lo + rng.randrange(hi - lo)
            if side == "left":
                a = rng.choice(pool)
            else:
                b = rng.choice(pool)
            truth = colors[a if side == "left" else b] == "red"
            ident = f"{split}-{j}-0"
            for k, idx in enumerate((a, b)):
                Image.open(root / "images" / f"digit_{idx:05d}.png").save(folder / f"{ident}-img{k}.png")
            sentence = f"the digit in the {side} image is red"
            texts.append(sentence)
            lines.append(json.dumps({"identifier": f"{ident}-0", "sentence": sentence, "label": str(truth)}))
        p = root / f"nlvr2_{split}.json"
        p.write_text("\n".join(lines) + "\n")
        nlvr_paths.append(p)
    classes = root / "classes.txt"
    classes.write_text("\n".join(WORDS) + "\n")
    color_classes = root / "color_classes.txt"
    color_classes.write_text("\n".join(COLORS) + "\n")
    texts += [f"a {c} digit" for c in COLORS]
    # a word-level model: every word one piece (short sequences keep the CPU tests fast)
    words = sorted({w for t in texts for w in t.replace("?", " ?").split()})
    tok = TextTokenizer.train(texts, root / "spm" / "digits", vocab_size=len(words) + 3 + spm_extra,
                              model_type="word", character_coverage=1.0, num_threads=1)
    return DigitsCorpus(root=root, spm=Path(tok.path), karpathy=karpathy, vqa_train_questions=vqa_paths[0],
                        vqa_train_annotations=vqa_paths[1], vqa_val_questions=vqa_paths[2],
                        vqa_val_annotations=vqa_paths[3], nlvr2_train=nlvr_paths[0], nlvr2_dev=nlvr_paths[1],
                        classes=classes, color_classes=color_classes, labels=labels, colors=colors)


def convert_corpus(c: DigitsCorpus, out: str | Path | None = None) -> Path:
    """Run the ``convert_data`` commands over a corpus' raw files; returns the index folder
    (``digits_{retrieval,captioning}.{train,val,test}.jsonl``, ``vqa.{train,val}.jsonl`` with
    ``answer2label.txt``, ``nlvr2.{train,dev}.jsonl``, ``colors.{train,val}.jsonl``)."""
    from beit3.finetune.convert_data import main as convert

    idx = Path(out) if out is not None else c.root / "idx"
    common = ["--spm", str(c.spm), "--data-root", str(c.root)]
    convert(["karpathy", "--karpathy", str(c.karpathy), "--name", "digits", "--out-dir", str(idx), *common])
    vocab = str(idx / "answer2label.txt")
    convert(["vqav2", "--questions", str(c.vqa_train_questions), "--annotations", str(c.vqa_train_annotations),
             "--image-dir", "train2014", "--out", str(idx / "vqa.train.jsonl"), "--answer-vocab", vocab,
             "--build-vocab", "--min-count", "1", *common])
    convert(["vqav2", "--questions", str(c.vqa_val_questions), "--annotations", str(c.vqa_val_annotations),
             "--image-dir", "val2014", "--out", str(idx / "vqa.val.jsonl"), "--answer-vocab", vocab, *common])
    for split, raw in (("train", c.nlvr2_train), ("dev", c.nlvr2_dev)):
        convert(["nlvr2", "--annotations", str(raw), "--image-dir", f"nlvr2/{split}",
                 "--out", str(idx / f"nlvr2.{split}.jsonl"), *common])
    for split in ("train", "val"):
        convert(["image-folder", "--root", str(c.root / "colors" / split), "--data-root", str(c.root),
                 "--out", str(idx / f"colors.{split}.jsonl"), "--classes", str(c.color_classes)])
    return idx


def main(argv: list[str] | None = None) -> Path:
    """``python -m beit3.demo.finetune_data OUT [--n 240]``: the corpus and its index files."""
    import argparse

    ap = argparse.ArgumentParser(description="digits demo corpus for every fine-tuning task")
    ap.add_argument("out")
    ap.add_argument("--n", type=int, default=240, help="images (3/4 train, the rest val/test)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    idx = convert_corpus(make_digits_corpus(args.out, n=args.n, seed=args.seed))
    print(f"data root: {args.out}\nindex files: {idx}\nspm: {Path(args.out) / 'spm' / 'digits.model'}")
    return idx


if __name__ == "__main__":
    main()


__all__ = ["make_digits_corpus", "convert_corpus", "main", "DigitsCorpus", "WORDS", "COLORS", "CAPTIONS"]
