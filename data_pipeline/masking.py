"""Block-wise image masking (BEiT, exact-count variant of BEiT v2) and text masking.

Image: blocks of >= ``min_block`` patches with aspect ratio in [min_aspect, max_aspect] are added
until the target count is reached (a block is accepted only if it adds 1..remaining new cells;
up to 10 attempts per block; a round that adds nothing stops), then missing cells are masked at
random so that the count ALWAYS equals the target. ``BlockMaskGenerator`` runs this on Python
integer bitmasks with precomputed rectangle masks (one AND + popcount per attempt);
``block_mask_reference`` is the straightforward numpy-array loop. Both consume the same uniform
stream, so they return identical masks (tested) and the bench compares their speed.

Text: ``mask_text`` picks exactly ``max(1, round(ratio * n))`` of the n maskable positions (all
positions except special tokens: <s>, </s>, <pad>, <unk>, <mask>) and replaces each by <mask>
(probability ``replace_mask``), a random ordinary token (``replace_random``) or keeps it.
"""
from __future__ import annotations

import math

import numpy as np

_ATTEMPTS = 10


class UniformStream:
    """Uniform [0, 1) numbers drawn in chunks from a generator (cheap per-value access)."""

    __slots__ = ("rng", "buf", "pos")

    def __init__(self, rng: np.random.Generator, chunk: int = 256) -> None:
        self.rng = rng
        self.buf = rng.random(chunk).tolist()
        self.pos = 0

    def next4(self) -> tuple[float, float, float, float]:
        if self.pos + 4 > len(self.buf):
            self.buf = self.rng.random(len(self.buf)).tolist()
            self.pos = 0
        p = self.pos
        self.pos = p + 4
        b = self.buf
        return b[p], b[p + 1], b[p + 2], b[p + 3]

    def take(self, n: int) -> np.ndarray:
        return self.rng.random(n)


def _fill_to_target(mask: np.ndarray, target: int, stream: UniformStream) -> np.ndarray:
    """BEiT v2's exact-count fix: mask missing / unmask surplus cells at random."""
    count = int(mask.sum())
    if count != target:
        keys = stream.take(mask.size)
        if count < target:
            cand = np.flatnonzero(~mask)
            mask[cand[np.argsort(keys[cand], kind="stable")[: target - count]]] = True
        else:
            cand = np.flatnonzero(mask)
            mask[cand[np.argsort(keys[cand], kind="stable")[: count - target]]] = False
    return mask


class BlockMaskGenerator:
    """``gen(rng) -> bool[H*W]`` with exactly ``target`` True (masked) cells."""

    def __init__(self, grid: int, target: int, min_block: int = 16, max_block: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None) -> None:
        if not 0 < target < grid * grid:
            raise ValueError(f"mask target {target} must be in (0, {grid * grid})")
        self.H = self.W = grid
        self.target = target
        self.min_block = min_block
        self.max_block = target if max_block is None else max_block
        max_aspect = max_aspect or 1.0 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        H, W = self.H, self.W
        # rects[h][w][top * (W - w + 1) + left] = bitmask of that rectangle (h < H, w < W)
        row = [0] * (W + 1)
        for w in range(1, W + 1):
            row[w] = (1 << w) - 1
        self.rects: list[list[list[int]]] = [[[] for _ in range(W)] for _ in range(H)]
        for h in range(1, H):
            for w in range(1, W):
                block = 0
                for r in range(h):
                    block |= row[w] << (r * W)
                self.rects[h][w] = [block << (top * W + left) for top in range(H - h + 1) for left in range(W - w + 1)]
        self._nbytes = (H * W + 7) // 8

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        stream = UniformStream(rng)
        H, W, target, min_block = self.H, self.W, self.target, self.min_block
        la0, la1 = self.log_aspect
        rects = self.rects
        mask = 0
        count = 0
        while count < target:
            max_mask = min(target - count, self.max_block)
            delta = 0
            for _ in range(_ATTEMPTS):
                a, b, c, d = stream.next4()
                area = min_block + a * (max_mask - min_block)
                aspect = math.exp(la0 + b * (la1 - la0))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if 0 < h < H and 0 < w < W:
                    top = int(c * (H - h + 1))
                    left = int(d * (W - w + 1))
                    rect = rects[h][w][top * (W - w + 1) + left]
                    new = h * w - (rect & mask).bit_count()
                    if 0 < new <= max_mask:
                        mask |= rect
                        delta = new
                        break
            if delta == 0:
                break
            count += delta
        out = np.unpackbits(np.frombuffer(mask.to_bytes(self._nbytes, "little"), dtype=np.uint8),
                            bitorder="little")[: H * W].astype(bool)
        return _fill_to_target(out, target, stream)


def block_mask_reference(grid: int, target: int, rng: np.random.Generator, min_block: int = 16,
                         max_block: int | None = None, min_aspect: float = 0.3,
                         max_aspect: float | None = None) -> np.ndarray:
    """The straightforward loop (BEiT's ``MaskingGenerator`` + BEiT v2's exact count) on a numpy array."""
    stream = UniformStream(rng)
    max_block = target if max_block is None else max_block
    la0, la1 = math.log(min_aspect), math.log(max_aspect or 1.0 / min_aspect)
    mask = np.zeros((grid, grid), dtype=bool)
    count = 0
    while count < target:
        max_mask = min(target - count, max_block)
        delta = 0
        for _ in range(_ATTEMPTS):
            a, b, c, d = stream.next4()
            area = min_block + a * (max_mask - min_block)
            aspect = math.exp(la0 + b * (la1 - la0))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < grid and 0 < w < grid:
                top = int(c * (grid - h + 1))
                left = int(d * (grid - w + 1))
                new = 0
                for i in range(top, top + h):
                    for j in range(left, left + w):
                        if not mask[i, j]:
                            new += 1
                if 0 < new <= max_mask:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            mask[i, j] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    return _fill_to_target(mask.reshape(-1), target, stream)


def mask_text(ids: np.ndarray, ratio: float, rng: np.random.Generator, special_ids: np.ndarray,
              mask_id: int, replace_mask: float = 1.0, replace_random: float = 0.0,
              num_ordinary: tuple[int, int] = (4, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Mask one sequence (with <s>/</s>, without padding).

    Returns (input ids after replacement, bool mask of predicted positions). Random replacements
    are drawn from the ordinary ids ``[num_ordinary[0], num_ordinary[1])`` (default up to mask_id).
    """
    cand = np.flatnonzero(~np.isin(ids, special_ids))
    chosen = np.zeros(len(ids), dtype=bool)
    out = ids.copy()
    if len(cand) == 0:
        return out, chosen
    n = min(len(cand), max(1, int(round(ratio * len(cand)))))
    pos = cand[rng.permutation(len(cand))[:n]]
    chosen[pos] = True
    if replace_mask >= 1.0:
        out[pos] = mask_id
    else:
        u = rng.random(n)
        lo, hi = num_ordinary[0], num_ordinary[1] or mask_id
        out[pos[u < replace_mask]] = mask_id
        rnd = pos[(u >= replace_mask) & (u < replace_mask + replace_random)]
        out[rnd] = rng.integers(lo, hi, size=len(rnd))
    return out, chosen


__all__ = ["BlockMaskGenerator", "block_mask_reference", "mask_text", "UniformStream"]
