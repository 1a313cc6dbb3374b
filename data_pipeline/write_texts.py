"""``python -m beit3.data_pipeline.write_texts INPUT... OUT --spm MODEL``: text -> token-segment shards.

Inputs: plain text files (a document is a run of non-empty lines separated by a blank line, or
one line with ``--doc-sep line``) and JSONL files (one document per record, field ``text``).
Each document is tokenized once and cut into segments of ``--segment-len`` tokens (default 126,
so that <s> segment </s> fills ``max_text_len`` = 128); a last piece shorter than
``--min-tokens`` is dropped unless it is the whole document. Each sample: ``tokens.npy`` (int32
model ids, no <s>/</s>) and ``json`` ({"doc", "seg", "src"}). Empty or unparsable documents
are skipped and reported. ``--workers N``: N processes tokenize, N write whole shards (same
bytes for any N).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from .tokenizer import TextTokenizer
from .writing import add_shard_args, ordered_map, report, setup_logging, worker_pool, write_sharded


def iter_documents(path: Path, doc_sep: str, skipped: Counter) -> Iterator[str]:
    """Documents of one input file (empty / unparsable ones are counted in ``skipped``)."""
    with io.open(path, encoding="utf-8", errors="strict") as f:
        try:
            if path.suffix.lower() == ".jsonl":
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        text = rec["text"]
                    except (ValueError, KeyError, TypeError):
                        skipped["bad_record"] += 1
                        continue
                    if not isinstance(text, str) or not text.strip():
                        skipped["empty_text"] += 1
                        continue
                    yield text
                return
            buf: list[str] = []
            for line in f:
                line = line.strip()
                if doc_sep == "line":
                    if line:
                        yield line
                    continue
                if line:
                    buf.append(line)
                elif buf:
                    yield " ".join(buf)
                    buf = []
            if buf:
                yield " ".join(buf)
        except UnicodeDecodeError:
            skipped["undecodable_text"] += 1


def segments(ids: list[int], segment_len: int, min_tokens: int) -> list[list[int]]:
    """Cut one document into training-length segments."""
    out = [ids[i:i + segment_len] for i in range(0, len(ids), segment_len)]
    if len(out) > 1 and len(out[-1]) < min_tokens:
        out.pop()
    return out


_TOKENIZER: list[TextTokenizer] = []  # the worker process's tokenizer (``_load_tokenizer``)


def _load_tokenizer(spm: str) -> None:
    _TOKENIZER[:] = [TextTokenizer(spm)]


def _tokenize(doc: str) -> list[int]:
    return _TOKENIZER[0].encode(doc)


def _documents(inputs: list[Path], doc_sep: str, skipped: Counter) -> Iterator[tuple[int, int, str]]:
    for fi, path in enumerate(inputs):
        for di, doc in enumerate(iter_documents(path, doc_sep, skipped)):
            yield fi, di, doc


def _identity(sample: dict) -> dict:
    return sample


def _segment_samples(docs: Iterator, ids_of: Iterator, segment_len: int, min_tokens: int,
                     skipped: Counter) -> Iterator[tuple[dict, int]]:
    """(sample, planned size) of every segment, in document order."""
    n = 0
    for (fi, di, _), ids in zip(docs, ids_of):
        if not ids:
            skipped["empty_text"] += 1
            continue
        for si, seg in enumerate(segments(ids, segment_len, min_tokens)):
            yield {"__key__": f"{n:010d}", "tokens.npy": np.asarray(seg, dtype=np.int32),
                   "json": {"src": fi, "doc": di, "seg": si}}, 128  # two non-bytes fields: 64 each
            n += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m beit3.data_pipeline.write_texts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="text / JSONL files, then the output folder")
    p.add_argument("--spm", required=True, type=Path, help="SentencePiece model (TextTokenizer)")
    p.add_argument("--segment-len", type=int, default=126, help="tokens per segment (default 126)")
    p.add_argument("--min-tokens", type=int, default=8, help="drop shorter trailing segments (default 8)")
    p.add_argument("--doc-sep", choices=("blank", "line"), default="blank", help="document separator (text files)")
    add_shard_args(p, "texts", 50000)
    args = p.parse_args(argv)
    setup_logging()
    if len(args.inputs) < 2:
        raise SystemExit("write_texts: give at least one input file and the output folder")
    *inputs, out = args.inputs
    missing = [str(i) for i in inputs if not i.is_file()]
    if missing:
        raise SystemExit(f"write_texts: input file(s) not found: {missing}")
    if args.segment_len < 1:
        raise SystemExit("write_texts: --segment-len must be >= 1")
    tok = TextTokenizer(args.spm)
    spm_md5 = hashlib.md5(Path(args.spm).read_bytes()).hexdigest()
    skipped: Counter = Counter()
    # two views of one document stream; tee buffers only the documents in flight in the workers
    docs, to_tokenize = itertools.tee(_documents(inputs, args.doc_sep, skipped))
    with worker_pool(args.workers, _load_tokenizer, (str(args.spm),)) as workers:  # tokenize + write shards
        ids_of = ordered_map(_tokenize, (doc for _, _, doc in to_tokenize), workers)
        manifest, total, dropped = write_sharded(
            _segment_samples(docs, ids_of, args.segment_len, args.min_tokens, skipped), _identity, out, args.prefix,
            "text", args, {"spm": str(args.spm), "spm_md5": spm_md5, "vocab_size": tok.vocab_size,
                           "segment_len": args.segment_len}, workers)
    report("write_texts", total, skipped + dropped, manifest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
