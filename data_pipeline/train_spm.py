"""``python -m beit3.data_pipeline.train_spm INPUT... --out-prefix PREFIX``: train a SentencePiece model.

Inputs: plain text (one text per line), JSONL (``text``/``caption``) or webdataset tars
(``txt`` members, e.g. pair shards). Writes ``PREFIX.model`` / ``PREFIX.vocab`` in the XLM-R id
layout that ``TextTokenizer`` expects (<unk>=0, <s>=1, </s>=2 in the .model).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .tokenizer import TextTokenizer
from .writing import setup_logging


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m beit3.data_pipeline.train_spm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("--out-prefix", required=True, type=Path)
    p.add_argument("--vocab-size", type=int, default=64000, help="spm pieces (default 64000; <pad>, <mask> come on top)")
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--input-sentence-size", type=int, default=10_000_000, help="sentences sampled for training")
    args = p.parse_args(argv)
    setup_logging()
    missing = [str(i) for i in args.inputs if not i.is_file()]
    if missing:
        raise SystemExit(f"train_spm: input file(s) not found: {missing}")
    tok = TextTokenizer.train([str(i) for i in args.inputs], args.out_prefix, args.vocab_size,
                              model_type=args.model_type, input_sentence_size=args.input_sentence_size)
    print(f"train_spm: {tok.path} ({tok.num_pieces} pieces, vocab_size={tok.vocab_size}, mask_id={tok.mask_id})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
