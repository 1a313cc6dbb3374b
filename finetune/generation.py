"""Caption decoding: beam search over a ``CaptioningModel``, with or without the KV cache.

Each step predicts the next token at an appended mask token (as the model was fine-tuned):
the input is ``[BOS, w1 .. w_t, MASK]`` and the logits are read at ``MASK``. With the cache,
a step feeds only ``[w_t, MASK]``; the mask token's keys/values are dropped after the step,
so the cache always holds the image and the real tokens. Both paths compute the same
distributions, so they return the same sequences.

Hypothesis score: ``sum log p / len ** length_penalty`` where ``len`` counts the generated
tokens including EOS (the Hugging Face convention, length penalty 0.6 in the BEiT-3 release).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from beit3.model.beit3 import KVCache

from .heads import CaptioningModel


STYLES = ("hf", "official")


@dataclass
class GenerationConfig:
    """``style``: ``hf`` (Hugging Face-style beam search, ``max_len`` = generated tokens with EOS) or
    ``official`` (the BEiT-3 release's decoder, ``max_len`` = its ``num_max_bpe_tokens``: BOS,
    the tokens and the EOS slot; see :func:`official_beam_search`)."""

    num_beams: int = 3
    max_len: int = 32  # generated tokens, EOS included (style hf); BOS + tokens + EOS slot (official)
    min_len: int = 0
    length_penalty: float = 0.6
    use_cache: bool = True
    style: str = "hf"

    def __post_init__(self) -> None:
        from beit3.model.config import ConfigError

        if self.style not in STYLES:
            raise ConfigError(f"generation.style={self.style!r}: must be one of {STYLES}")
        if self.style == "official" and (self.max_len < 3 or self.min_len):
            raise ConfigError(f"generation.max_len={self.max_len}, min_len={self.min_len}: the official decoder "
                              "needs max_len >= 3 (BOS, a token, EOS) and has no min_len")
        if self.num_beams < 1:
            raise ConfigError(f"generation.num_beams={self.num_beams}: must be >= 1")
        if self.max_len < 1:
            raise ConfigError(f"generation.max_len={self.max_len}: must be >= 1")
        if not 0 <= self.min_len <= self.max_len:
            raise ConfigError(f"generation.min_len={self.min_len}: must be in [0, max_len]")


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    pad: int
    mask: int
    vocab_size: int = 0  # > 0: ids from here on (model rows the tokenizer lacks) are never generated


def _drop_last(cache: KVCache) -> None:
    """Forget the last cached position (the mask token of the step just taken)."""
    cache.keys = [k[:, :, :-1] for k in cache.keys]
    cache.values = [v[:, :, :-1] for v in cache.values]
    cache.text_length -= 1


class _Stepper:
    """Next-token log-probabilities for beams ``[B*K, t]`` (BOS first), cached or not."""

    def __init__(self, model: CaptioningModel, images: Tensor, ids: SpecialIds, num_beams: int,
                 use_cache: bool) -> None:
        self.model, self.ids, self.K = model, ids, num_beams
        self.images = images
        self.use_cache = use_cache
        self.cache: Optional[KVCache] = None
        self.expanded = images.repeat_interleave(num_beams, dim=0)  # [B*K, C, H, W]

    def _logits(self, hidden_last: Tensor) -> Tensor:
        return self.model.mlm_head(hidden_last).float()  # [*, V]

    def first(self) -> Tensor:
        """Log-probs of the first token, one row per image ``[B, V]``."""
        B = self.images.shape[0]
        dev = self.images.device
        text = torch.tensor([[self.ids.bos, self.ids.mask]], device=dev).expand(B, 2)
        if self.use_cache:
            self.cache = KVCache()
            out = self.model.beit3(images=self.images, text_ids=text, causal_text=True, kv_cache=self.cache)
            _drop_last(self.cache)
            self.cache.reorder(torch.arange(B, device=dev).repeat_interleave(self.K))  # [B*K, ...]
        else:
            out = self.model.beit3(images=self.images, text_ids=text, causal_text=True)
        return F.log_softmax(self._logits(out.hidden[:, -1]), dim=-1)

    def next(self, seqs: Tensor, beam_index: Tensor) -> Tensor:
        """Log-probs after ``seqs [B*K, t]`` whose rows came from beams ``beam_index [B*K]``."""
        mask = torch.full((seqs.shape[0], 1), self.ids.mask, dtype=seqs.dtype, device=seqs.device)
        if self.use_cache:
            assert self.cache is not None
            self.cache.reorder(beam_index)
            out = self.model.beit3(text_ids=torch.cat([seqs[:, -1:], mask], dim=1), kv_cache=self.cache)
            _drop_last(self.cache)
        else:
            out = self.model.beit3(images=self.expanded, text_ids=torch.cat([seqs, mask], dim=1), causal_text=True)
        return F.log_softmax(self._logits(out.hidden[:, -1]), dim=-1)


@torch.no_grad()
def beam_search(model: CaptioningModel, images: Tensor, ids: SpecialIds,
                cfg: GenerationConfig = GenerationConfig(),
                sync: Callable[[bool], bool] = lambda all_done: all_done) -> list[tuple[list[int], float]]:
    """Decode one caption per image ``[B, C, H, W]``: ``(token ids without BOS/EOS, score)``.

    ``sync(all_done) -> stop``: under data parallelism pass ``evaluation.all_ranks`` so that
    every rank runs the same number of steps (ZeRO-3 gathers parameters collectively).
    """
    if cfg.style == "official":
        return official_beam_search(model, images, ids, cfg, sync)
    was_training = model.training
    model.eval()
    B, K = images.shape[0], cfg.num_beams
    dev = images.device
    stepper = _Stepper(model, images, ids, K, cfg.use_cache)
    banned = [ids.bos, ids.pad, ids.mask]

    def ban(logp: Tensor, step: int) -> Tensor:
        logp[:, banned] = float("-inf")
        if ids.vocab_size:
            logp[:, ids.vocab_size:] = float("-inf")
        if step < cfg.min_len:
            logp[:, ids.eos] = float("-inf")
        return logp

    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    logp = ban(stepper.first(), 0)  # [B, V]
    V = logp.shape[-1]
    # beam state: scores [B, K], sequences [B*K, t] (BOS first)
    seqs = torch.full((B * K, 1), ids.bos, dtype=torch.long, device=dev)
    beam_scores = torch.zeros(B, K, device=dev)
    beam_scores[:, 1:] = float("-inf")  # the first step expands one beam only
    logp = logp.repeat_interleave(K, dim=0)  # [B*K, V]
    for step in range(cfg.max_len):
        cand = (beam_scores.view(-1, 1) + logp).view(B, K * V)  # [B, K*V]
        top_scores, top_idx = cand.topk(2 * K, dim=1)  # [B, 2K]
        next_scores = torch.zeros(B, K, device=dev)
        next_tokens = torch.full((B, K), ids.pad, dtype=torch.long, device=dev)
        next_beams = torch.zeros(B, K, dtype=torch.long, device=dev)
        gen_len = step + 1
        for b in range(B):
            if done[b]:
                next_beams[b] = torch.arange(K, device=dev) + b * K
                next_scores[b] = float("-inf")
                continue
            slot = 0
            for score, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                beam, token = divmod(idx, V)
                if score == float("-inf"):
                    break
                if token == ids.eos:
                    hyp = seqs[b * K + beam, 1:].tolist()
                    finished[b].append((score / gen_len ** cfg.length_penalty, hyp))
                    continue
                next_scores[b, slot], next_tokens[b, slot], next_beams[b, slot] = score, token, b * K + beam
                slot += 1
                if slot == K:
                    break
            finished[b].sort(key=lambda h: -h[0])
            del finished[b][K:]
            if slot == 0:
                done[b] = True
            elif len(finished[b]) == K:
                best_running = next_scores[b, :slot].max().item() / gen_len ** cfg.length_penalty
                if finished[b][-1][0] >= best_running:
                    done[b] = True
            if done[b]:
                next_scores[b] = float("-inf")
        beam_index = next_beams.view(-1)
        seqs = torch.cat([seqs.index_select(0, beam_index), next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores
        if sync(all(done)) or step == cfg.max_len - 1:
            break
        logp = ban(stepper.next(seqs, beam_index), step + 1)
    # beams that never emitted EOS within max_len count as finished at max_len
    for b in range(B):
        if not done[b]:
            for k in range(K):
                s = beam_scores[b, k].item()
                if s != float("-inf"):
                    finished[b].append((s / (seqs.shape[1] - 1) ** cfg.length_penalty, seqs[b * K + k, 1:].tolist()))
    model.train(was_training)
    results = []
    for b in range(B):
        if not finished[b]:
            results.append(([], float("-inf")))
            continue
        score, hyp = max(finished[b], key=lambda h: h[0])
        results.append((hyp, score))
    return results


class _BestHypothesis:
    """The official ``BeamHypotheses`` with one kept hypothesis (``num_keep_best = 1``): score
    ``sum log p / len ** length_penalty``; done once the kept score beats the best running sum
    normalized by ``max_len - 1``."""

    def __init__(self, max_len: int, length_penalty: float) -> None:
        self.norm, self.lp = max_len - 1, length_penalty
        self.best: Optional[tuple[float, list[int]]] = None

    def add(self, tokens: list[int], length: int, sum_logprobs: float) -> None:
        score = sum_logprobs / length ** self.lp
        if self.best is None or score > self.best[0]:
            self.best = (score, tokens)

    def is_done(self, best_sum_logprobs: float) -> bool:
        return self.best is not None and self.best[0] >= best_sum_logprobs / self.norm ** self.lp


@torch.no_grad()
def official_beam_search(model: CaptioningModel, images: Tensor, ids: SpecialIds, cfg: GenerationConfig,
                         sync: Callable[[bool], bool] = lambda all_done: all_done) -> list[tuple[list[int], float]]:
    """The BEiT-3 release's caption decoder (unilm ``beit3/engine_for_finetuning.py``,
    ``CaptioningHandler.eval_batch``), for reproducing its numbers: ``3 x num_beams`` candidates
    per step; a hypothesis ends at EOS, or at any token when the next position would reach
    ``max_len``, without that token; its score is normalized by ``len = 2 + tokens`` (BOS, the
    tokens, the EOS slot); no token is banned (special ids are dropped from the result, as its
    ``skip_special_tokens`` decode does). Returns ``(token ids, score)`` per image."""
    was_training = model.training
    model.eval()
    B, K, M = images.shape[0], cfg.num_beams, cfg.max_len
    dev = images.device
    stepper = _Stepper(model, images, ids, K, cfg.use_cache)
    hyps = [_BestHypothesis(M, cfg.length_penalty) for _ in range(B)]
    done = [False] * B
    seqs = torch.full((B * K, 1), ids.bos, dtype=torch.long, device=dev)  # [B*K, cur_len - 1], BOS first
    beam_scores = torch.zeros(B, K, device=dev)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    logp, beam_index = stepper.first().repeat_interleave(K, dim=0), None  # [B*K, V]
    cur_len = 2
    while cur_len <= M:
        if beam_index is not None:
            logp = stepper.next(seqs, beam_index)
        if ids.vocab_size:  # model rows the tokenizer lacks could not be decoded
            logp[:, ids.vocab_size:] = float("-inf")
        V = logp.shape[-1]
        top_scores, top_idx = (logp + beam_scores[:, None]).view(B, K * V).topk(3 * K, dim=1)  # [B, 3K]
        nxt: list[tuple[float, int, int]] = []
        for b in range(B):
            done[b] = done[b] or hyps[b].is_done(top_scores[b].max().item())
            beam = []
            if not done[b]:
                for score, idx in zip(top_scores[b].tolist(), top_idx[b].tolist()):
                    k, token = divmod(idx, V)
                    if (token == ids.eos and cur_len + 1 <= M) or cur_len + 1 == M:
                        hyps[b].add(seqs[b * K + k, 1:].tolist(), cur_len, score)
                    else:
                        beam.append((score, token, b * K + k))
                    if len(beam) == K:
                        break
            nxt.extend(beam or [(0.0, ids.pad, 0)] * K)  # a finished image keeps padded beams
        beam_scores = torch.tensor([x[0] for x in nxt], device=dev)
        beam_index = torch.tensor([x[2] for x in nxt], device=dev)
        words = torch.tensor([x[1] for x in nxt], dtype=torch.long, device=dev)
        seqs = torch.cat([seqs.index_select(0, beam_index), words[:, None]], dim=1)
        cur_len += 1
        if sync(all(done)):
            break
    model.train(was_training)
    special = {ids.bos, ids.eos, ids.pad, ids.mask}
    return [([t for t in h.best[1] if t not in special], h.best[0]) if h.best else ([], float("-inf"))
            for h in hyps]


__all__ = ["GenerationConfig", "SpecialIds", "beam_search", "official_beam_search"]
