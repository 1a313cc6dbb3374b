"""Evaluation metrics of the fine-tuning tasks, in one place.

- ``topk_accuracy``: classification top-1/top-5.
- ``vqa_soft_score`` / ``vqa_accuracy_from_answers`` / ``vqa_score``: VQAv2 accuracy (the official
  ``min(#humans/3, 1)`` averaged over the 10 leave-one-out subsets, which equals the soft scores
  0/0.3/0.6/0.9/1.0 for 0/1/2/3/>=4 matching annotators).
- ``retrieval_recall``: image->text and text->image R@K (several captions per image).
- ``bleu4`` (corpus BLEU-4 as coco-caption: closest reference length, its tiny smoothing) and
  ``cider_d`` (CIDEr-D as coco-caption: n<=4, sigma 6, tf-idf over the evaluated references,
  clipped counts, length penalty, x10).
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

# --------------------------------------------------------------------------- classification


def topk_accuracy(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Fraction of rows whose target is among the ``k`` highest logits, per ``k`` (``top1``, ``top5``)."""
    maxk = min(max(ks), logits.shape[-1])
    pred = logits.topk(maxk, dim=-1).indices  # [N, maxk]
    hit = pred.eq(targets.view(-1, 1))  # [N, maxk]
    return {f"top{k}": hit[:, : min(k, maxk)].any(dim=1).float().mean().item() for k in ks}


# --------------------------------------------------------------------------- VQA

VQA_SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)


def vqa_soft_score(count: int) -> float:
    """Target score of an answer given by ``count`` of the 10 annotators (official BEiT-3 table)."""
    return VQA_SOFT_SCORES[min(max(int(count), 0), 4)]


def vqa_accuracy_from_answers(prediction: str, human_answers: Sequence[str]) -> float:
    """The official VQA accuracy: mean over the leave-one-annotator-out subsets of
    ``min(matches / 3, 1)`` (answers compared after ``normalize_answer``)."""
    pred = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in human_answers]
    if not answers:
        raise ValueError("vqa_accuracy_from_answers needs at least one human answer")
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        accs.append(min(sum(a == pred for a in others) / 3.0, 1.0))
    return sum(accs) / len(accs)


def vqa_score(logits: Tensor, targets: Tensor) -> float:
    """Mean soft score of the argmax answer: ``targets[i, argmax(logits[i])]`` averaged (``[N, A]``)."""
    pred = logits.argmax(dim=-1)  # [N]
    return targets.gather(1, pred[:, None]).float().mean().item()


_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern (a period not before a digit)
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """VQA answer normalization as the official evaluator's ``processPunctuation`` +
    ``processDigitArticle``: punctuation removed (or turned into spaces), periods not before a
    digit dropped, lowercase, number words to digits (``two`` -> ``2``), articles dropped. Its
    contraction table (``dont`` -> ``don't`` ...) is not applied."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    strip = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        out = out.replace(p, "" if strip or (p + " " in text or " " + p in text) else " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(w for w in words if w not in _ARTICLES)


# --------------------------------------------------------------------------- retrieval


def retrieval_recall(scores: Tensor, text_to_image: Sequence[int] | Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@K both ways from a similarity matrix ``scores [N_img, N_txt]``.

    ``text_to_image[j]`` is the image index of text ``j`` (an image may have several texts).
    Image->text: an image is a hit at K if any of its texts is among its K best texts.
    Text->image: a text is a hit at K if its image is among its K best images.
    Keys: ``i2t_r1 ... t2i_r10`` (fractions) and ``rsum`` (sum of all, in percent).
    """
    t2i = torch.as_tensor(text_to_image, dtype=torch.long, device=scores.device)  # [N_txt]
    n_img, n_txt = scores.shape
    if t2i.numel() != n_txt:
        raise ValueError(f"text_to_image has {t2i.numel()} entries for {n_txt} texts")
    out: dict[str, float] = {}
    # image -> text: rank of the best-ranked positive text
    order = scores.argsort(dim=1, descending=True)  # [N_img, N_txt]
    positive = t2i[order] == torch.arange(n_img, device=scores.device)[:, None]  # [N_img, N_txt]
    has_pos = positive.any(dim=1)
    first_hit = torch.where(has_pos, positive.float().argmax(dim=1), torch.full_like(has_pos, n_txt, dtype=torch.long))
    # text -> image: rank of the true image
    order_t = scores.t().argsort(dim=1, descending=True)  # [N_txt, N_img]
    rank_t = (order_t == t2i[:, None]).float().argmax(dim=1)  # [N_txt]
    for k in ks:
        out[f"i2t_r{k}"] = (first_hit[has_pos] < k).float().mean().item() if has_pos.any() else 0.0
    for k in ks:
        out[f"t2i_r{k}"] = (rank_t < k).float().mean().item()
    out["rsum"] = 100.0 * sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks)
    return out


# --------------------------------------------------------------------------- captioning


def tokenize_caption(text: str) -> list[str]:
    """Lowercase words without punctuation (a stand-in for the PTB tokenizer of coco-caption)."""
    return re.sub(r"[^\w\s']", " ", text.lower()).split()


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _all_ngrams(words: Sequence[str], max_n: int) -> Counter:
    c: Counter = Counter()
    for n in range(1, max_n + 1):
        c.update(_ngrams(words, n))
    return c


def _check_pairs(hypotheses: Mapping, references: Mapping) -> list:
    keys = list(hypotheses)
    missing = [k for k in keys if k not in references or not references[k]]
    if missing:
        raise ValueError(f"no references for {len(missing)} hypothesis id(s), e.g. {missing[:3]}")
    return keys


def bleu4(hypotheses: Mapping[object, str], references: Mapping[object, Iterable[str]]) -> float:
    """Corpus BLEU-4 (coco-caption ``Bleu(4)``): clipped n-gram precisions summed over the corpus,
    brevity penalty against the closest reference length, geometric mean with its 1e-15/1e-9 smoothing."""
    keys = _check_pairs(hypotheses, references)
    tiny, small = 1e-15, 1e-9
    correct = [0] * 4
    guess = [0] * 4
    hyp_len = ref_len = 0
    for key in keys:
        hyp = tokenize_caption(hypotheses[key])
        refs = [tokenize_caption(r) for r in references[key]]
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
        for n in range(1, 5):
            h = _ngrams(hyp, n)
            max_ref: Counter = Counter()
            for r in refs:
                for g, c in _ngrams(r, n).items():
                    max_ref[g] = max(max_ref[g], c)
            correct[n - 1] += sum(min(c, max_ref[g]) for g, c in h.items())
            guess[n - 1] += max(len(hyp) - n + 1, 0)
    log_p = sum(math.log((correct[k] + tiny) / (guess[k] + small)) for k in range(4)) / 4
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / max(hyp_len, small))
    return bp * math.exp(log_p)


def cider_d(hypotheses: Mapping[object, str], references: Mapping[object, Iterable[str]],
            n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (coco-caption ``CiderD``), the mean of per-image scores.

    tf-idf n-gram vectors (idf from document frequency over the evaluated reference sets), per
    n the cosine with clipped hypothesis weights and a Gaussian length penalty on the
    difference of *bigram* counts (as coco-caption's ``counts2vec``), averaged over n and over
    references, times 10.
    """
    keys = _check_pairs(hypotheses, references)
    hyp_counts = {k: _all_ngrams(tokenize_caption(hypotheses[k]), n) for k in keys}
    ref_counts = {k: [_all_ngrams(tokenize_caption(r), n) for r in references[k]] for k in keys}
    df: Counter = Counter()
    for k in keys:
        df.update(set(g for c in ref_counts[k] for g in c))
    log_ref_len = math.log(float(len(keys)))

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [defaultdict(float) for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            i = len(g) - 1
            v[i][g] = float(tf) * (log_ref_len - math.log(max(1.0, df[g])))
            norm[i] += v[i][g] ** 2
            if i == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    total = 0.0
    for k in keys:
        vh, nh, lh = vec(hyp_counts[k])
        score = [0.0] * n
        for rc in ref_counts[k]:
            vr, nr, lr = vec(rc)
            delta = float(lh - lr)
            for i in range(n):
                val = sum(min(w, vr[i][g]) * vr[i][g] for g, w in vh[i].items())
                if nh[i] != 0 and nr[i] != 0:
                    val /= nh[i] * nr[i]
                score[i] += val * math.exp(-(delta ** 2) / (2 * sigma ** 2))
        total += sum(score) / n / len(ref_counts[k]) * 10.0
    return total / len(keys)


__all__ = ["topk_accuracy", "vqa_soft_score", "vqa_accuracy_from_answers", "vqa_score", "normalize_answer",
           "retrieval_recall", "bleu4", "cider_d", "tokenize_caption", "VQA_SOFT_SCORES"]
