"""The official fine-tuning index files (JSONL), read and written with validation.

One JSON object per line. Fields per task (the official ``*.index.jsonl`` layout):

==============  ======================================================================
classification  ``image_path``, ``label`` (int)
retrieval       ``image_path``, ``text_segment`` (token ids, no BOS/EOS), ``image_id``
captioning      ``image_path``, ``text_segment`` (may be null in eval files), ``image_id``;
                optional ``text`` (raw caption) / ``references`` (raw captions, eval)
vqa             ``image_path``, ``text_segment``, ``qid``, ``labels`` (answer ids),
                ``scores`` (soft scores); optional ``answers`` (raw annotator answers)
nlvr2           ``image_path``, ``image2_path``, ``text_segment``, ``label`` (0/1)
==============  ======================================================================

A malformed row raises ``IndexFormatError`` naming the file and line, unless the reader is
asked to skip bad rows (``skip_bad=True``), in which case they are counted and logged.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

logger = logging.getLogger(__name__)

TASKS = ("classification", "retrieval", "captioning", "vqa", "nlvr2")

REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    "classification": {"image_path": (str,), "label": (int,)},
    "retrieval": {"image_path": (str,), "text_segment": (list,), "image_id": (int, str)},
    "captioning": {"image_path": (str,), "image_id": (int, str)},
    "vqa": {"image_path": (str,), "text_segment": (list,), "qid": (int, str), "labels": (list,), "scores": (list,)},
    "nlvr2": {"image_path": (str,), "image2_path": (str,), "text_segment": (list,), "label": (int,)},
}


class IndexFormatError(ValueError):
    """A row of an index file is malformed; the message names the file and line."""


@dataclass
class IndexReport:
    """What a read kept and skipped."""

    path: str
    rows: int = 0
    skipped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


def validate_row(row: Any, task: str, vocab_size: Optional[int] = None,
                 num_labels: Optional[int] = None) -> None:
    """Raise ``ValueError`` (without location) if ``row`` is not a valid ``task`` row."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    for name, types in REQUIRED[task].items():
        if name not in row:
            raise ValueError(f"missing field {name!r}")
        value = row[name]
        if not isinstance(value, types) or isinstance(value, bool):
            raise ValueError(f"field {name!r} has type {type(value).__name__}, expected "
                             f"{'/'.join(t.__name__ for t in types)}")
    seg = row.get("text_segment")
    if seg is not None:
        if not isinstance(seg, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in seg):
            raise ValueError("field 'text_segment' must be a list of token ids")
        if task != "captioning" and not seg:
            raise ValueError("field 'text_segment' is empty")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in seg):
            bad = next(t for t in seg if not 0 <= t < vocab_size)
            raise ValueError(f"token id {bad} outside the vocabulary [0, {vocab_size})")
    if task in ("classification", "nlvr2"):
        limit = 2 if task == "nlvr2" else num_labels
        if row["label"] < 0 or (limit is not None and row["label"] >= limit):
            raise ValueError(f"label {row['label']} outside [0, {limit})")
    if task == "vqa":
        labels, scores = row["labels"], row["scores"]
        if len(labels) != len(scores):
            raise ValueError(f"'labels' ({len(labels)}) and 'scores' ({len(scores)}) differ in length")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
            raise ValueError("'labels' must be answer ids (integers)")
        if num_labels is not None and any(not 0 <= x < num_labels for x in labels):
            raise ValueError(f"answer id outside [0, {num_labels})")
        if not all(isinstance(s, (int, float)) and 0 <= s <= 1 for s in scores):
            raise ValueError("'scores' must be numbers in [0, 1]")


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``("file:line", parsed row)`` for each non-blank line of a JSONL file; a line that is not
    JSON yields ``("file:line", json.JSONDecodeError)`` so the caller decides to fail or skip."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file {str(p)!r} does not exist")
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{p}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{p}:{lineno}", e


def read_index(path: str | Path, task: str, *, vocab_size: Optional[int] = None,
               num_labels: Optional[int] = None, skip_bad: bool = False) -> tuple[list[dict], IndexReport]:
    """All valid rows of a JSONL index. Blank lines are ignored."""
    if task not in TASKS:
        raise ValueError(f"task={task!r}: choose one of {TASKS}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"index file {str(p)!r} does not exist")
    rows: list[dict] = []
    report = IndexReport(str(p))
    for where, row in iter_jsonl(p):
        try:
            if isinstance(row, json.JSONDecodeError):
                raise row
            validate_row(row, task, vocab_size, num_labels)
        except (json.JSONDecodeError, ValueError) as e:
            msg = f"{where}: bad {task} row: {e}"
            if not skip_bad:
                raise IndexFormatError(msg) from None
            logger.warning(msg)
            report.skip(str(e).split(":")[0])
            continue
        rows.append(row)
    report.rows = len(rows)
    if report.skipped:
        logger.warning("%s: skipped %d bad row(s) of %d: %s", p, report.skipped, report.rows + report.skipped,
                       report.reasons)
    return rows, report


def write_index(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as JSONL (atomically: a temporary file renamed at the end). Returns the count."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(p)
    return n


def read_answer_vocab(path: str | Path) -> list[str]:
    """``answer2label.txt`` (official): one ``{"answer": str, "label": int}`` per line, labels 0..A-1."""
    p = Path(path)
    answers: dict[int, str] = {}
    for where, row in iter_jsonl(p):
        try:
            if isinstance(row, json.JSONDecodeError):
                raise row
            answers[int(row["label"])] = str(row["answer"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise IndexFormatError(f"{where}: bad answer2label row: {e}") from None
    if sorted(answers) != list(range(len(answers))):
        raise IndexFormatError(f"{p}: labels must be 0..{len(answers) - 1} without gaps")
    return [answers[i] for i in range(len(answers))]


def write_answer_vocab(path: str | Path, answers: list[str]) -> None:
    write_index(path, ({"answer": a, "label": i} for i, a in enumerate(answers)))


__all__ = ["TASKS", "IndexFormatError", "IndexReport", "validate_row", "read_index", "write_index",
           "read_answer_vocab", "write_answer_vocab"]
