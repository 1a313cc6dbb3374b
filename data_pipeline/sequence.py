"""The global sample sequence of one source: a pure function of (seed, source, position).

Position ``n`` (0, 1, 2, ...: the n-th sample this source feeds to training, counted over all
ranks) maps to a sample of the dataset as follows. Epoch ``e = n // N`` (N samples in all);
the epoch's shard order is a permutation seeded by (seed, source, e); consecutive runs of
``window`` shards form shuffle windows, and the samples of a window are visited in a random
permutation seeded by (seed, source, e, window). Every sample appears exactly once per epoch,
reads stay within ``window`` shards at a time, and the mapping needs no state: any rank or
worker computes any position, whatever the number of ranks or workers.

Per-sample randomness (augmentation, masking, replacement of a bad sample) comes from
``sample_rng(seed, source, n, attempt)``, also a pure function of the position.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

SOURCE_IDS = {"image": 1, "text": 2, "pair": 3}


def sample_rng(seed: int, source: str, position: int, attempt: int = 0) -> np.random.Generator:
    """The generator for one sample position (attempt > 0: replacements of a skipped sample).

    Counter-based (Philox keyed by seed, source, position, attempt): no seeding hash, ~30%
    cheaper to create than a SeedSequence-seeded PCG64, and independent streams per key.
    """
    if not 0 <= attempt < (1 << 24):
        raise ValueError(f"attempt {attempt} out of range")
    key = np.array([position & 0xFFFFFFFFFFFFFFFF,
                    ((seed & 0xFFFFFFFF) << 32) | (SOURCE_IDS[source] << 24) | attempt], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


class GlobalSampleSequence:
    """position -> (shard index, sample offset in the shard, global sample id)."""

    def __init__(self, counts: Sequence[int], seed: int, source: str, window: int = 16) -> None:
        self.counts = np.asarray(counts, dtype=np.int64)
        self.total = int(self.counts.sum())
        if self.total <= 0:
            raise ValueError("a sample sequence needs at least one sample")
        self.shard_start = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        self.seed, self.source, self.window = seed, source, max(1, int(window))
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, window start offsets within the epoch)."""
        hit = self._epochs.get(e)
        if hit is None:
            rng = np.random.Generator(np.random.PCG64([self.seed & 0xFFFFFFFF, SOURCE_IDS[self.source], e, 0xE90C]))
            order = rng.permutation(len(self.counts))
            sizes = np.add.reduceat(self.counts[order], np.arange(0, len(order), self.window))
            hit = (order, np.concatenate([[0], np.cumsum(sizes)]))
            self._epochs[e] = hit
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return hit

    def _window(self, e: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample permutation, shard ids of the window, cumulative counts) of window w of epoch e."""
        hit = self._windows.get((e, w))
        if hit is None:
            order, starts = self._epoch(e)
            shards = order[w * self.window:(w + 1) * self.window]
            size = int(starts[w + 1] - starts[w])
            rng = np.random.Generator(np.random.PCG64([self.seed & 0xFFFFFFFF, SOURCE_IDS[self.source], e, w, 0x5A3D]))
            hit = (rng.permutation(size), shards, np.cumsum(self.counts[shards]))
            self._windows[(e, w)] = hit
            while len(self._windows) > 4:
                self._windows.popitem(last=False)
        return hit

    def windows_ahead(self, position: int) -> tuple[tuple[int, int], list[int]]:
        """((epoch, window) of ``position``, shard ids of that window then of the next one,
        which may be the first window of the next epoch): what a reader at ``position`` needs soon."""
        e, r = divmod(int(position), self.total)
        order, starts = self._epoch(e)
        w = int(np.searchsorted(starts, r, side="right")) - 1
        now = order[w * self.window:(w + 1) * self.window]
        if (w + 1) * self.window < len(order):
            nxt = order[(w + 1) * self.window:(w + 2) * self.window]
        else:
            nxt = self._epoch(e + 1)[0][:self.window]
        return (e, w), [int(s) for s in now] + [int(s) for s in nxt]

    def locate(self, position: int, replacement: int | None = None) -> tuple[int, int, int]:
        """Sample at ``position``; ``replacement`` (a uniform index drawn by the caller for a
        skipped sample) picks another sample of the same shuffle window instead."""
        e, r = divmod(int(position), self.total)
        _, starts = self._epoch(e)
        w = int(np.searchsorted(starts, r, side="right")) - 1
        perm, shards, cum = self._window(e, w)
        q = int(r - starts[w]) if replacement is None else int(replacement) % len(perm)
        k = int(perm[q])
        i = int(np.searchsorted(cum, k, side="right"))
        shard = int(shards[i])
        offset = k - (int(cum[i - 1]) if i else 0)
        return shard, offset, int(self.shard_start[shard]) + offset


__all__ = ["GlobalSampleSequence", "sample_rng", "SOURCE_IDS"]
