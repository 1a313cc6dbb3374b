"""``pretrain/train.py`` with a deliberately broken objective, for the loss-curve guard's negative
test: every MLM label is shifted by one position (``text_labels`` rolled right along the sequence).

The shift is applied to the loader's batches, upstream of whatever forward/objective the trainer
uses, so the test keeps meaning the same thing when the step's implementation changes.
"""
from __future__ import annotations

import sys

import torch

from beit3.pretrain import train


class ShiftedLabelsLoader(train.PretrainLoader):
    def __iter__(self):
        for batch in super().__iter__():
            for src in batch.values():
                if isinstance(src, dict) and "text_labels" in src:
                    src["text_labels"] = torch.roll(src["text_labels"], shifts=1, dims=1)
            yield batch


train.PretrainLoader = ShiftedLabelsLoader

if __name__ == "__main__":
    train.main(sys.argv[1:])
