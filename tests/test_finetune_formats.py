"""Raw annotation formats (Karpathy JSON, VQAv2 questions + annotations, NLVR2 JSONL, image folder)
-> the official index JSONL; bad rows fail naming file and line, or are skipped and counted."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from beit3.data_pipeline.tokenizer import TextTokenizer
from beit3.finetune import convert_data as C
from beit3.finetune.datasets import ImageViewConfig, TaskDataset, collate
from beit3.finetune.formats import IndexFormatError, read_answer_vocab, read_index
from beit3.finetune.metrics import normalize_answer
from beit3.demo.finetune_data import make_digits_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_digits_corpus(tmp_path_factory.mktemp("fmt_digits"), n=16)


@pytest.fixture(scope="module")
def tok(corpus):
    return TextTokenizer(str(corpus.spm))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_karpathy_to_retrieval_and_captioning(corpus, tok, tmp_path):
    data = json.loads(corpus.karpathy.read_text())
    # one image missing on disk, one without captions: both skipped and counted
    data["images"].append({"filepath": "images", "filename": "nope.png", "split": "train", "cocoid": 999,
                           "sentences": [{"raw": "a red digit one"}]})
    data["images"].append({"filepath": "images", "filename": "digit_00000.png", "split": "restval", "cocoid": 998,
                           "sentences": [{"raw": "  "}]})
    raw = tmp_path / "karpathy.json"
    raw.write_text(json.dumps(data))
    report = C.main(["karpathy", "--karpathy", str(raw), "--spm", str(corpus.spm), "--data-root", str(corpus.root),
                     "--out-dir", str(tmp_path / "out"), "--name", "d"])
    assert report.skipped == {"missing image": 1, "no caption": 1}
    train = _jsonl(tmp_path / "out" / "d_retrieval.train.jsonl")
    assert len(train) == 12 * 4 == report.written["d_retrieval.train"]  # 12 train images x 4 captions
    first = data["images"][0]
    assert train[0] == {"image_path": "images/digit_00000.png", "image_id": 0,
                        "text_segment": tok.encode(first["sentences"][0]["raw"])}
    assert tok.decode(train[0]["text_segment"]) == first["sentences"][0]["raw"]
    cap_val = _jsonl(tmp_path / "out" / "d_captioning.val.jsonl")
    assert all(r["text_segment"] is None and len(r["references"]) == 4 for r in cap_val)
    # the written files read back through the validating reader
    rows, rep = read_index(tmp_path / "out" / "d_captioning.train.jsonl", "captioning", vocab_size=tok.vocab_size)
    assert len(rows) == 48 and rep.skipped == 0


def test_karpathy_malformed_entry_names_file_and_entry(corpus, tmp_path):
    raw = tmp_path / "bad.json"
    raw.write_text(json.dumps({"images": [{"filepath": "images", "filename": "digit_00000.png", "split": "train",
                                           "sentences": []}, {"filename": "x.png", "sentences": []}]}))
    with pytest.raises(IndexFormatError, match=r"bad\.json: images\[1\]: missing field 'split'"):
        C.convert_karpathy(raw, str(corpus.spm), corpus.root, tmp_path / "out")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [\n  {"split": "train",,}\n]}')
    with pytest.raises(IndexFormatError, match=r"broken\.json:2: invalid JSON"):
        C.convert_karpathy(broken, str(corpus.spm), corpus.root, tmp_path / "out")


def test_vqav2_targets_and_skips(corpus, tok, tmp_path):
    qs = json.loads(corpus.vqa_train_questions.read_text())
    anns = json.loads(corpus.vqa_train_annotations.read_text())
    qs["questions"].append({"image_id": 500, "question": "what digit is this?", "question_id": 5000})  # no image
    qs["questions"].append({"image_id": 0, "question": "is this digit even?", "question_id": 5001})  # no annotation
    qp, ap = tmp_path / "q.json", tmp_path / "a.json"
    qp.write_text(json.dumps(qs))
    ap.write_text(json.dumps(anns))
    out, vocab = tmp_path / "vqa.jsonl", tmp_path / "answer2label.txt"
    report = C.main(["vqav2", "--questions", str(qp), "--annotations", str(ap), "--image-dir", "train2014",
                     "--spm", str(corpus.spm), "--data-root", str(corpus.root), "--out", str(out),
                     "--answer-vocab", str(vocab), "--build-vocab", "--min-count", "1"])
    assert report.skipped["missing image"] == 1 and report.skipped["no annotation"] == 1
    answers = read_answer_vocab(vocab)
    rows = _jsonl(out)
    assert len(rows) == 12 * 3
    by_qid = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in anns["annotations"]}
    for row in rows:
        human = by_qid[row["qid"]]
        norm = [normalize_answer(a) for a in human]  # "three" -> "3" as the official evaluator
        counts = {a: norm.count(a) for a in set(norm)}
        # soft score of every answer: 0.3 per annotator, 1.0 from 4 (min(n/3, 1) over leave-one-out subsets)
        want = {a: min(1.0, [0.0, 0.3, 0.6, 0.9][n] if n < 4 else 1.0) for a, n in counts.items()}
        assert {answers[lab]: sc for lab, sc in zip(row["labels"], row["scores"])} == pytest.approx(want)
        assert row["answers"] == human
        assert row["image_path"] == f"train2014/COCO_train2014_{row['qid'] // 10:012d}.png"
    got, _ = read_index(out, "vqa", vocab_size=tok.vocab_size, num_labels=len(answers))
    assert len(got) == len(rows)
    qs["questions"][3].pop("question")
    qp.write_text(json.dumps(qs))
    with pytest.raises(IndexFormatError, match=r"q\.json: questions\[3\]: missing field 'question'"):
        C.convert_vqav2(qp, ap, "train2014", str(corpus.spm), corpus.root, out, vocab)


def test_nlvr2_rows_and_bad_lines(corpus, tok, tmp_path):
    lines = corpus.nlvr2_train.read_text().splitlines()
    missing = json.loads(lines[0])
    missing["identifier"] = "train-999-0-0"  # no such images
    raw = tmp_path / "nlvr2.json"
    raw.write_text("\n".join(lines + [json.dumps(missing), ""]))
    out = tmp_path / "nlvr2.jsonl"
    report = C.main(["nlvr2", "--annotations", str(raw), "--image-dir", "nlvr2/train", "--spm", str(corpus.spm),
                     "--data-root", str(corpus.root), "--out", str(out)])
    assert report.skipped == {"missing image": 1}
    rows = _jsonl(out)
    assert len(rows) == len(lines) == 12
    for line, row in zip(lines, rows):
        ex = json.loads(line)
        assert row["label"] == int(ex["label"] == "True")
        assert row["image_path"] == f"nlvr2/train/{ex['identifier'][:-2]}-img0.png"
        assert row["image2_path"] == f"nlvr2/train/{ex['identifier'][:-2]}-img1.png"
        assert tok.decode(row["text_segment"]) == ex["sentence"]
    bad = dict(json.loads(lines[1]), label="maybe")
    raw.write_text("\n".join([lines[0], json.dumps(bad)]))
    with pytest.raises(IndexFormatError, match=r"nlvr2\.json:2: label 'maybe'"):
        C.convert_nlvr2(raw, "nlvr2/train", str(corpus.spm), corpus.root, out)
    raw.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(IndexFormatError, match=r"nlvr2\.json:2: invalid JSON"):
        C.convert_nlvr2(raw, "nlvr2/train", str(corpus.spm), corpus.root, out)


def test_image_folder_classes(corpus, tmp_path):
    out, classes = tmp_path / "cls.jsonl", tmp_path / "classes.txt"
    C.main(["image-folder", "--root", str(corpus.root / "colors" / "train"), "--data-root", str(corpus.root),
            "--out", str(out), "--classes", str(classes)])
    names = classes.read_text().split()
    assert names == sorted({c for c in corpus.colors[:12]})
    rows = _jsonl(out)
    assert len(rows) == 12
    for row in rows:
        i = int(Path(row["image_path"]).stem)
        assert names[row["label"]] == corpus.colors[i]


def test_read_index_bad_rows_fail_with_file_and_line_or_are_counted(tmp_path):
    p = tmp_path / "cls.jsonl"
    p.write_text("\n".join([
        json.dumps({"image_path": "a.png", "label": 1}),
        json.dumps({"image_path": "b.png"}),  # line 2: no label
        "{oops",  # line 3: not JSON
        "",  # blank lines are ignored
        json.dumps({"image_path": "c.png", "label": 7}),  # line 5: outside the classes
        json.dumps({"image_path": "d.png", "label": True}),  # line 6: a bool is not a label
    ]) + "\n")
    with pytest.raises(IndexFormatError, match=r"cls\.jsonl:2: bad classification row: missing field 'label'"):
        read_index(p, "classification", num_labels=3)
    rows, report = read_index(p, "classification", num_labels=3, skip_bad=True)
    assert [r["image_path"] for r in rows] == ["a.png"]
    assert report.skipped == 4 and report.rows == 1
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text(json.dumps({"image_path": "a.png", "text_segment": [5, 99], "qid": 1, "labels": [0],
                               "scores": [1.0]}) + "\n")
    with pytest.raises(IndexFormatError, match=r"vqa\.jsonl:1: .*token id 99 outside the vocabulary"):
        read_index(vqa, "vqa", vocab_size=36, num_labels=2)


def test_unreadable_image_is_skipped_and_counted(corpus, tmp_path):
    import shutil

    shutil.copy(corpus.root / "images" / "digit_00000.png", tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"image_path": "good.png", "label": 0}, {"image_path": "broken.png", "label": 1}]
    ds = TaskDataset(rows, "classification", tmp_path, ImageViewConfig(32, False))
    batch = collate([ds[0], ds[1]])
    assert batch["skipped"] == 1 and batch["size"] == 1
    assert batch["images"].shape == (1, 3, 32, 32) and torch.equal(batch["labels"], torch.tensor([0]))
