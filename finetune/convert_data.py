"""Raw dataset annotations -> the official fine-tuning index files (``formats``).

Commands (``python -m beit3.finetune.convert_data CMD ...``)::

    karpathy     --karpathy dataset_coco.json --spm beit3.spm --data-root ROOT --out-dir OUT [--name coco]
                 COCO / Flickr30K Karpathy splits -> {name}_retrieval.{split}.jsonl and
                 {name}_captioning.{split}.jsonl (train = train + restval)
    vqav2        --questions Q.json [--annotations A.json] --image-dir train2014 --spm ... --data-root ROOT
                 --out vqa.train.jsonl --answer-vocab answer2label.txt [--build-vocab --min-count 9 --max-answers 3129]
    nlvr2        --annotations train.json --image-dir images/train --spm ... --data-root ROOT --out nlvr2.train.jsonl
    image-folder --root ROOT/train --data-root ROOT --out cls.train.jsonl [--classes classes.txt]

Rows whose images are missing under ``--data-root`` are skipped and counted (a summary is
logged and returned); a malformed annotation file or line fails with the file and line.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from .formats import IndexFormatError, iter_jsonl, read_answer_vocab, write_answer_vocab, write_index
from .metrics import normalize_answer, vqa_soft_score

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class ConversionReport:
    """Rows written and skipped (with reasons) by one conversion."""

    written: dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)

    def log(self) -> None:
        logger.info("wrote %s; skipped %s", self.written, dict(self.skipped) or "nothing")


def _load_json(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"annotation file {str(p)!r} does not exist")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise IndexFormatError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None


def _field(obj: Any, name: str, where: str) -> Any:
    if not isinstance(obj, dict) or name not in obj:
        raise IndexFormatError(f"{where}: missing field {name!r}")
    return obj[name]


def _tokenizer(spm: str):
    from beit3.data_pipeline.tokenizer import TextTokenizer

    return TextTokenizer(spm)


# --------------------------------------------------------------------------- COCO / Flickr30K


def convert_karpathy(karpathy_json: str | Path, spm: str, data_root: str | Path, out_dir: str | Path,
                     name: str = "coco") -> ConversionReport:
    """Karpathy split file -> retrieval and captioning index files per split."""
    tok = _tokenizer(spm)
    data = _load_json(karpathy_json)
    images = _field(data, "images", str(karpathy_json))
    root = Path(data_root)
    report = ConversionReport()
    retrieval: dict[str, list[dict]] = defaultdict(list)
    captioning: dict[str, list[dict]] = defaultdict(list)
    for i, img in enumerate(images):
        where = f"{karpathy_json}: images[{i}]"
        split = _field(img, "split", where)
        split = "train" if split == "restval" else split
        rel = str(Path(img.get("filepath", "")) / _field(img, "filename", where))
        if not (root / rel).is_file():
            report.skipped["missing image"] += 1
            continue
        image_id = img.get("cocoid", img.get("imgid", i))
        raws = [s.get("raw", "").strip() for s in _field(img, "sentences", where) if isinstance(s, dict)]
        raws = [r for r in raws if r]
        if not raws:
            report.skipped["no caption"] += 1
            continue
        for raw in raws:
            seg = tok.encode(raw)
            retrieval[split].append({"image_path": rel, "text_segment": seg, "image_id": image_id})
            if split == "train":
                captioning[split].append({"image_path": rel, "text_segment": seg, "image_id": image_id, "text": raw})
        if split != "train":
            captioning[split].append({"image_path": rel, "text_segment": None, "image_id": image_id,
                                      "references": raws})
    out = Path(out_dir)
    for split, rows in retrieval.items():
        report.written[f"{name}_retrieval.{split}"] = write_index(out / f"{name}_retrieval.{split}.jsonl", rows)
    for split, rows in captioning.items():
        report.written[f"{name}_captioning.{split}"] = write_index(out / f"{name}_captioning.{split}.jsonl", rows)
    report.log()
    return report


# --------------------------------------------------------------------------- VQAv2


def build_answer_vocab(annotation_files: Iterable[str | Path], min_count: int = 9,
                       max_answers: int = 3129) -> list[str]:
    """Most frequent ``multiple_choice_answer``s (normalized) seen at least ``min_count`` times."""
    counts: Counter = Counter()
    for path in annotation_files:
        anns = _field(_load_json(path), "annotations", str(path))
        for j, a in enumerate(anns):
            counts[normalize_answer(str(_field(a, "multiple_choice_answer", f"{path}: annotations[{j}]")))] += 1
    ranked = sorted((a for a, c in counts.items() if c >= min_count and a), key=lambda a: (-counts[a], a))
    return ranked[:max_answers]


def vqa_targets(answers: list[str], answer_to_label: dict[str, int]) -> tuple[list[int], list[float]]:
    """Answer ids and soft scores from the annotators' answers (answers outside the vocab dropped)."""
    counts = Counter(normalize_answer(a) for a in answers)
    labels, scores = [], []
    for ans, c in sorted(counts.items(), key=lambda x: (-x[1], x[0])):
        if ans in answer_to_label:
            labels.append(answer_to_label[ans])
            scores.append(vqa_soft_score(c))
    return labels, scores


def convert_vqav2(questions: str | Path, annotations: Optional[str | Path], image_dir: str, spm: str,
                  data_root: str | Path, out: str | Path, answer_vocab: str | Path,
                  build_vocab: bool = False, min_count: int = 9, max_answers: int = 3129) -> ConversionReport:
    """VQAv2 questions (+ annotations) -> VQA index rows; images ``{image_dir}/COCO_{image_dir}_{id:012d}.jpg``
    (or any file of that stem with a known extension)."""
    tok = _tokenizer(spm)
    report = ConversionReport()
    if build_vocab:
        if annotations is None:
            raise ValueError("--build-vocab needs --annotations")
        vocab = build_answer_vocab([annotations], min_count, max_answers)
        write_answer_vocab(answer_vocab, vocab)
        report.written["answer_vocab"] = len(vocab)
    vocab = read_answer_vocab(answer_vocab)
    a2l = {a: i for i, a in enumerate(vocab)}
    qs = _field(_load_json(questions), "questions", str(questions))
    anns: dict[Any, dict] = {}
    if annotations is not None:
        for j, a in enumerate(_field(_load_json(annotations), "annotations", str(annotations))):
            anns[_field(a, "question_id", f"{annotations}: annotations[{j}]")] = a
    root = Path(data_root)
    stem_prefix = f"COCO_{Path(image_dir).name}_"
    rows = []
    for j, q in enumerate(qs):
        where = f"{questions}: questions[{j}]"
        qid, image_id = _field(q, "question_id", where), _field(q, "image_id", where)
        text = _field(q, "question", where)
        rel = _find_image(root, image_dir, f"{stem_prefix}{int(image_id):012d}")
        if rel is None:
            report.skipped["missing image"] += 1
            continue
        row: dict[str, Any] = {"image_path": rel, "text_segment": tok.encode(str(text)), "qid": qid,
                               "labels": [], "scores": []}
        if annotations is not None:
            if qid not in anns:
                report.skipped["no annotation"] += 1
                continue
            answers = [str(a.get("answer", "")) for a in _field(anns[qid], "answers", f"{annotations}: qid {qid}")]
            row["labels"], row["scores"] = vqa_targets(answers, a2l)
            row["answers"] = answers
            if not row["labels"]:
                report.skipped["kept, no answer in vocab"] += 1
        rows.append(row)
    report.written[Path(out).stem] = write_index(out, rows)
    report.log()
    return report


def _find_image(root: Path, image_dir: str, stem: str) -> Optional[str]:
    for ext in IMAGE_EXTENSIONS:
        rel = f"{image_dir}/{stem}{ext}"
        if (root / rel).is_file():
            return rel
    return None


# --------------------------------------------------------------------------- NLVR2


def convert_nlvr2(annotations: str | Path, image_dir: str, spm: str, data_root: str | Path,
                  out: str | Path) -> ConversionReport:
    """NLVR2 JSONL (``identifier``, ``sentence``, ``label`` "True"/"False", optional ``directory``)
    -> rows with ``{image_dir}[/{directory}]/{identifier minus last part}-img0/1.png``."""
    tok = _tokenizer(spm)
    report = ConversionReport()
    root = Path(data_root)
    rows = []
    p = Path(annotations)
    if not p.is_file():
        raise FileNotFoundError(f"annotation file {str(p)!r} does not exist")
    for where, ex in iter_jsonl(p):
        if isinstance(ex, json.JSONDecodeError):
            raise IndexFormatError(f"{where}: invalid JSON ({ex.msg})")
        ident, sentence = str(_field(ex, "identifier", where)), str(_field(ex, "sentence", where))
        label = str(_field(ex, "label", where)).lower()
        if label not in ("true", "false"):
            raise IndexFormatError(f"{where}: label {ex['label']!r} is neither True nor False")
        prefix = ident.rsplit("-", 1)[0]
        folder = f"{image_dir}/{ex['directory']}" if "directory" in ex else image_dir
        paths = [f"{folder}/{prefix}-img{k}.png" for k in (0, 1)]
        if not all((root / rel).is_file() for rel in paths):
            report.skipped["missing image"] += 1
            continue
        if not sentence.strip():
            report.skipped["empty sentence"] += 1
            continue
        rows.append({"image_path": paths[0], "image2_path": paths[1], "text_segment": tok.encode(sentence),
                     "label": int(label == "true"), "identifier": ident})
    report.written[Path(out).stem] = write_index(out, rows)
    report.log()
    return report


# --------------------------------------------------------------------------- image folder


def convert_image_folder(root: str | Path, data_root: str | Path, out: str | Path,
                         classes: Optional[str | Path] = None) -> ConversionReport:
    """``root/<class>/<image>`` -> classification rows; class ids follow sorted class names
    (or the order of an existing ``classes`` file, one name per line, which is written if absent)."""
    root, data_root = Path(root), Path(data_root)
    report = ConversionReport()
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    if classes is not None and Path(classes).is_file():
        names = [n.strip() for n in Path(classes).read_text().splitlines() if n.strip()]
    elif classes is not None:
        Path(classes).write_text("\n".join(names) + "\n")
    rows = []
    for label, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            report.skipped["missing class folder"] += 1
            continue
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                rows.append({"image_path": str(f.resolve().relative_to(data_root.resolve())), "label": label})
            else:
                report.skipped["not an image"] += 1
    report.written[Path(out).stem] = write_index(out, rows)
    report.log()
    return report


def main(argv: Optional[list[str]] = None) -> ConversionReport:
    ap = argparse.ArgumentParser(prog="beit3.finetune.convert_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("karpathy")
    k.add_argument("--karpathy", required=True)
    k.add_argument("--name", default="coco")
    k.add_argument("--out-dir", required=True)
    v = sub.add_parser("vqav2")
    v.add_argument("--questions", required=True)
    v.add_argument("--annotations")
    v.add_argument("--image-dir", required=True)
    v.add_argument("--out", required=True)
    v.add_argument("--answer-vocab", required=True)
    v.add_argument("--build-vocab", action="store_true")
    v.add_argument("--min-count", type=int, default=9)
    v.add_argument("--max-answers", type=int, default=3129)
    n = sub.add_parser("nlvr2")
    n.add_argument("--annotations", required=True)
    n.add_argument("--image-dir", required=True)
    n.add_argument("--out", required=True)
    c = sub.add_parser("image-folder")
    c.add_argument("--root", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--classes")
    for p in (k, v, n):
        p.add_argument("--spm", required=True, help="SentencePiece model (beit3.spm)")
    for p in (k, v, n, c):
        p.add_argument("--data-root", required=True, help="image paths are written relative to this folder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.cmd == "karpathy":
        return convert_karpathy(args.karpathy, args.spm, args.data_root, args.out_dir, args.name)
    if args.cmd == "vqav2":
        return convert_vqav2(args.questions, args.annotations, args.image_dir, args.spm, args.data_root, args.out,
                             args.answer_vocab, args.build_vocab, args.min_count, args.max_answers)
    if args.cmd == "nlvr2":
        return convert_nlvr2(args.annotations, args.image_dir, args.spm, args.data_root, args.out)
    return convert_image_folder(args.root, args.data_root, args.out, args.classes)


if __name__ == "__main__":
    main()


__all__ = ["ConversionReport", "convert_karpathy", "build_answer_vocab", "vqa_targets", "convert_vqav2",
           "convert_nlvr2", "convert_image_folder", "main"]
