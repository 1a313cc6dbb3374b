"""Fine-tuning metrics against hand-computed small cases."""
import math

import pytest
import torch

from beit3.finetune import metrics as M


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    targets = torch.tensor([1, 2, 2, 1])
    res = M.topk_accuracy(logits, targets, ks=(1, 2))
    assert res["top1"] == pytest.approx(2 / 4)  # rows 0 and 2
    assert res["top2"] == pytest.approx(3 / 4)  # + row 3 (second best), row 1 misses (2 is tied last)


@pytest.mark.parametrize("count", range(0, 11))
def test_vqa_soft_score_equals_official_leave_one_out_accuracy(count):
    answers = ["two"] * count + ["three"] * (10 - count)
    official = M.vqa_accuracy_from_answers("two", answers)
    assert official == pytest.approx(M.vqa_soft_score(count), abs=1e-9)


def test_vqa_accuracy_normalizes_answers_and_hand_values():
    # 1 of 10 agree: 9 subsets keep it (1/3), 1 subset drops it (0) -> 0.3
    assert M.vqa_accuracy_from_answers("A Dog.", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
    assert M.vqa_accuracy_from_answers("yes", ["no"] * 10) == 0.0


def test_vqa_score_reads_target_at_argmax():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    targets = torch.tensor([[0.6, 1.0, 0.0], [0.0, 0.3, 0.9]])
    assert M.vqa_score(logits, targets) == pytest.approx((0.6 + 0.9) / 2)


def test_retrieval_recall_hand_case():
    # 2 images, 4 texts; texts 0,1 belong to image 0, texts 2,3 to image 1
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2],   # image 0: best text 1 (its own) -> hit at 1
                           [0.8, 0.1, 0.2, 0.7]])  # image 1: order 0,3,2,1 -> own text 3 at rank 2
    res = M.retrieval_recall(scores, [0, 0, 1, 1], ks=(1, 2))
    assert res["i2t_r1"] == pytest.approx(0.5)
    assert res["i2t_r2"] == pytest.approx(1.0)
    # text 0: images (0.1, 0.8) -> rank of image 0 is 2; text 1: image 0 first; text 2: image 1 (0.2 < 0.3)
    # rank 2; text 3: image 1 first
    assert res["t2i_r1"] == pytest.approx(0.5)
    assert res["t2i_r2"] == pytest.approx(1.0)
    assert res["rsum"] == pytest.approx(100 * (0.5 + 1 + 0.5 + 1))


def test_bleu4_hand_case():
    # p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2; brevity penalty exp(1 - 6/5)
    got = M.bleu4({1: "a b c d e"}, {1: ["a b c d f g"]})
    want = math.exp(1 - 6 / 5) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert got == pytest.approx(want, rel=1e-6)
    assert M.bleu4({1: "the cat sat on the mat"}, {1: ["The cat sat on the mat.", "a dog"]}) == pytest.approx(1.0)
    # the closest reference length sets the brevity penalty
    assert M.bleu4({1: "a b c d"}, {1: ["a b c d", "a b c d e f g h"]}) == pytest.approx(1.0)


def test_cider_d_hand_case():
    hyps = {1: "a b", 2: "c e"}
    refs = {1: ["a b"], 2: ["c d"]}
    # image 1: cosine 1 for n=1,2 and 0 for n=3,4 -> 10 * 2/4 = 5
    # image 2: n=1 cosine 1/2 ("c" shared, equal idf log 2), n=2 none -> 10 * 0.5/4 = 1.25
    assert M.cider_d(hyps, refs) == pytest.approx((5.0 + 1.25) / 2, rel=1e-9)


def test_cider_d_zero_idf_and_length_penalty():
    # an n-gram in every image's references carries no weight
    hyps = {1: "x a", 2: "x b"}
    refs = {1: ["x a"], 2: ["x b"]}
    s = M.cider_d(hyps, refs)
    assert 0 < s < 10
    # longer hypotheses are penalized: exp(-delta^2 / 72) on the bigram-count difference
    long = M.cider_d({1: "a b a b a b a b", 2: "c d"}, {1: ["a b"], 2: ["c d"]})
    short = M.cider_d({1: "a b", 2: "c d"}, {1: ["a b"], 2: ["c d"]})
    assert long < short


def test_caption_metrics_need_references():
    with pytest.raises(ValueError, match="no references"):
        M.bleu4({1: "a"}, {})
