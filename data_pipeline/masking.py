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

Replacement scheme (the paper gives only the ratios): by default every chosen token becomes
``<mask>`` (``replace_mask=1``), as masked image patches all become the mask token; this keeps
what the model sees at a masked position the same for both modalities and for the pair text
(50%), where random replacements would corrupt much of the caption. ``<unk>`` counts as special:
predicting it teaches nothing. BERT's 80/10/10 is available through the config.
"""
from __future__ import annotations

import math

import numpy as np

_ATTEMPTS = 10
_CHUNK = 256


class UniformStream:
    """Uniform [0, 1) numbers drawn in chunks from a generator (cheap per-value access)."""

    __slots__ = ("rng", "buf", "pos")

    def __init__(self, rng: np.random.Generator, chunk: int = _CHUNK) -> None:
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
        self._packed: tuple[np.ndarray, np.ndarray] | None = None

    def _packed_rects(self) -> tuple[np.ndarray, np.ndarray]:
        """(rect id table [H, W, H, W] (-1: invalid), rect bitmasks [R, words] uint64) for ``batch``."""
        if self._packed is None:
            H, W = self.H, self.W
            words = (H * W + 63) // 64
            ids = np.full((H, W, H, W), -1, dtype=np.int64)
            masks = []
            for h in range(1, H):
                for w in range(1, W):
                    for k, m in enumerate(self.rects[h][w]):
                        top, left = divmod(k, W - w + 1)
                        ids[h, w, top, left] = len(masks)
                        masks.append(m)
            table = np.frombuffer(b"".join(m.to_bytes(words * 8, "little") for m in masks),
                                  dtype="<u8").reshape(len(masks), words).copy()
            self._packed = (ids, table)
        return self._packed

    def batch(self, rngs: list[np.random.Generator]) -> np.ndarray:
        """Masks for many images at once: bool [B, H*W]; row i equals ``self(rngs[i])``.

        The attempt loop runs vectorized over the images (numpy, packed uint64 bitmasks and a
        popcount per attempt); only the rare extra uniform chunks and the final count fix are
        per image.
        """
        B = len(rngs)
        H, W, target, min_block = self.H, self.W, self.target, self.min_block
        P = H * W
        if B == 0:
            return np.zeros((0, P), dtype=bool)
        ids, table = self._packed_rects()
        chunk = _CHUNK
        U = np.stack([r.random(chunk) for r in rngs])
        drawn = np.ones(B, dtype=np.int64)
        M = np.zeros((B, table.shape[1]), dtype=np.uint64)
        count = np.zeros(B, dtype=np.int64)
        ptr = np.zeros(B, dtype=np.int64)
        tries = np.zeros(B, dtype=np.int64)
        active = np.ones(B, dtype=bool)
        la0, la1 = self.log_aspect
        while True:
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            need = idx[4 * ptr[idx] + 4 > chunk * drawn[idx]]
            for i in need.tolist():  # a new chunk of uniforms, as UniformStream draws it
                if U.shape[1] < chunk * (drawn[i] + 1):
                    U = np.concatenate([U, np.zeros((B, chunk))], axis=1)
                U[i, chunk * drawn[i]: chunk * (drawn[i] + 1)] = rngs[i].random(chunk)
                drawn[i] += 1
            cols = 4 * ptr[idx]
            a, b, c, d = (U[idx, cols + t] for t in range(4))
            max_mask = np.minimum(target - count[idx], self.max_block)
            area = min_block + a * (max_mask - min_block)
            aspect = np.exp(la0 + b * (la1 - la0))
            h = np.rint(np.sqrt(area * aspect)).astype(np.int64)
            w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
            valid = (h > 0) & (h < H) & (w > 0) & (w < W)
            hc, wc = np.clip(h, 1, H - 1), np.clip(w, 1, W - 1)
            top = (c * (H - hc + 1)).astype(np.int64)
            left = (d * (W - wc + 1)).astype(np.int64)
            rid = ids[hc, wc, top, left]
            rect = table[rid]
            new = hc * wc - np.bitwise_count(rect & M[idx]).sum(axis=1, dtype=np.int64)
            ok = valid & (new > 0) & (new <= max_mask)
            acc = idx[ok]
            M[acc] |= rect[ok]
            count[acc] += new[ok]
            tries[acc] = 0
            rej = idx[~ok]
            tries[rej] += 1
            ptr[idx] += 1
            active[acc[count[acc] >= target]] = False
            active[rej[tries[rej] >= _ATTEMPTS]] = False
        out = np.unpackbits(M.astype("<u8").view(np.uint8).reshape(B, -1), axis=1, bitorder="little")[:, :P].astype(bool)
        fix = np.flatnonzero(count != target)
        if fix.size:  # exact count, vectorized over the images that need it (same draws as _fill_to_target)
            keys = np.stack([rngs[i].random(P) for i in fix.tolist()])
            sub = out[fix]
            have = sub.sum(axis=1)
            deficit = have < target
            # missing cells: the lowest-key unmasked cells; surplus: the lowest-key masked cells
            cand = np.where(deficit[:, None], ~sub, sub)
            k = np.where(cand, keys, np.inf)
            order = np.argsort(k, axis=1, kind="stable")
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(P)[None, :].repeat(len(fix), 0), axis=1)
            flip = rank < np.abs(target - have)[:, None]
            out[fix] = sub ^ flip
        return out

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
