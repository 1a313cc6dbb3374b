"""SentencePiece text tokenizer with the XLM-R / fairseq id convention used by BEiT-3.

The ``.spm`` model stores ``<unk>``=0, ``<s>``=1, ``</s>``=2 and the pieces from 3 on (as
``beit3.spm`` and XLM-R's model do). Model ids follow fairseq's dictionary: ``<s>``=0,
``<pad>``=1, ``</s>``=2, ``<unk>``=3, piece ``p`` (p >= 3) -> ``p + 1``, and ``<mask>`` after the
last piece (``len(spm) + 1``; 64001 for ``beit3.spm``). ``vocab_size = mask_id + 1``.
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

logger = logging.getLogger(__name__)

BOS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_FAIRSEQ_OFFSET = 1


class TextTokenizer:
    """One tokenizer for pretraining and fine-tuning. ``encode`` returns piece ids without
    ``<s>``/``</s>``; callers add them (``encode_with_specials``)."""

    bos_id = BOS_ID
    pad_id = PAD_ID
    eos_id = EOS_ID
    unk_id = UNK_ID

    def __init__(self, spm_path: str | Path) -> None:
        path = Path(spm_path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model {str(path)!r} does not exist")
        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        n = self.sp.get_piece_size()
        if self.sp.unk_id() != 0 or self.sp.bos_id() != 1 or self.sp.eos_id() != 2:
            raise ValueError(f"{self.path}: expected <unk>=0, <s>=1, </s>=2 in the spm model (XLM-R layout), got "
                             f"unk={self.sp.unk_id()} bos={self.sp.bos_id()} eos={self.sp.eos_id()}")
        self.num_pieces = n
        self.mask_id = n + _FAIRSEQ_OFFSET
        self.vocab_size = self.mask_id + 1
        # spm id -> model id (vectorised mapping)
        table = np.arange(n, dtype=np.int64) + _FAIRSEQ_OFFSET
        table[0], table[1], table[2] = UNK_ID, BOS_ID, EOS_ID
        self._to_model = table
        inv = np.zeros(self.vocab_size, dtype=np.int64)
        inv[table] = np.arange(n)
        inv[PAD_ID] = -1
        inv[self.mask_id] = -1
        self._to_spm = inv

    def __getstate__(self) -> dict:
        return {"spm_path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["spm_path"])

    @property
    def special_ids(self) -> tuple[int, ...]:
        return (BOS_ID, PAD_ID, EOS_ID, UNK_ID, self.mask_id)

    def encode(self, text: str) -> list[int]:
        """Text -> model ids (no <s>/</s>)."""
        return self._to_model[np.asarray(self.sp.encode(text), dtype=np.int64)].tolist()

    def encode_with_specials(self, text: str, max_len: int) -> list[int]:
        """``<s> ids[:max_len-2] </s>``."""
        return [BOS_ID] + self.encode(text)[: max_len - 2] + [EOS_ID]

    def decode(self, ids: Sequence[int]) -> str:
        """Model ids -> text; special ids (<s>, <pad>, </s>, <mask>) are dropped."""
        arr = np.asarray(list(ids), dtype=np.int64)
        arr = arr[(arr >= 0) & (arr < self.vocab_size)]
        keep = ~np.isin(arr, (BOS_ID, PAD_ID, EOS_ID, self.mask_id))
        return self.sp.decode(self._to_spm[arr[keep]].tolist())

    def __len__(self) -> int:
        return self.vocab_size

    @classmethod
    def train(cls, files_or_iter: Iterable[str] | Sequence[str | Path], out_prefix: str | Path,
              vocab_size: int = 64000, *, model_type: str = "unigram", character_coverage: float = 0.9999,
              input_sentence_size: int = 10_000_000, num_threads: int = 4) -> "TextTokenizer":
        """Train an spm model (``{out_prefix}.model``, XLM-R id layout) and load it.

        ``files_or_iter``: paths (plain text: one sentence/document per line; ``.jsonl``: the
        ``text``/``caption`` field; ``.tar``: the ``txt`` members of webdataset shards) or an
        iterable of strings. ``vocab_size`` counts spm pieces (``<mask>`` and ``<pad>`` come on top).
        """
        out_prefix = Path(out_prefix)
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        sentences = _iter_training_text(files_or_iter)
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences, model_prefix=str(out_prefix), vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=num_threads, minloglevel=2)
        model = Path(f"{out_prefix}.model")
        logger.info("trained SentencePiece model %s (%d pieces)", model, vocab_size)
        return cls(model)


def _iter_training_text(source: Iterable[str] | Sequence[str | Path]) -> Iterator[str]:
    items = list(source) if isinstance(source, (list, tuple)) else source
    for item in items:
        p = Path(item) if isinstance(item, Path) or (isinstance(item, str) and "\n" not in item
                                                       and len(item) < 4096 and Path(item).is_file()) else None
        if p is None:
            if isinstance(item, str) and item.strip():
                yield item.strip()
            continue
        yield from iter_text_file(p)


def iter_text_file(path: Path) -> Iterator[str]:
    """Non-empty texts of a plain file (per line), a JSONL (``text``/``caption``) or a tar (``txt``)."""
    name = path.name.lower()
    if name.endswith(".tar"):
        with tarfile.open(path) as tf:
            for m in tf:
                if m.isfile() and m.name.endswith(".txt"):
                    f = tf.extractfile(m)
                    text = f.read().decode("utf-8", errors="replace").strip() if f else ""
                    if text:
                        yield text
        return
    with io.open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if name.endswith(".jsonl"):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                text = rec.get("text") or rec.get("caption") if isinstance(rec, dict) else None
                if isinstance(text, str) and text.strip():
                    yield text.strip()
            else:
                yield line


__all__ = ["TextTokenizer", "iter_text_file", "BOS_ID", "PAD_ID", "EOS_ID", "UNK_ID"]
