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


def test_top1_top5_hand_case():
    # 7 classes; the target's rank per row: 0, 4, 5, 6 -> top1 1/4, top5 2/4
    order = torch.tensor([[3, 0, 1, 2, 4, 5, 6], [0, 1, 2, 4, 3, 5, 6], [0, 1, 2, 4, 5, 3, 6], [0, 1, 2, 4, 5, 6, 3]])
    logits = torch.empty(4, 7)
    for r in range(4):
        logits[r, order[r]] = torch.arange(7, 0, -1).float()  # first in the order gets the highest logit
    res = M.topk_accuracy(logits, torch.tensor([3, 3, 3, 3]))
    assert res == pytest.approx({"top1": 0.25, "top5": 0.5})


@pytest.mark.parametrize("count", range(0, 11))
def test_vqa_soft_score_equals_official_leave_one_out_accuracy(count):
    answers = ["two"] * count + ["three"] * (10 - count)
    official = M.vqa_accuracy_from_answers("two", answers)
    assert official == pytest.approx(M.vqa_soft_score(count), abs=1e-9)


def test_vqa_accuracy_normalizes_answers_and_hand_values():
    # 1 of 10 agree: 9 subsets keep it (1/3), 1 subset drops it (0) -> 0.3
    assert M.vqa_accuracy_from_answers("A Dog.", ["dog"] + ["cat"] * 9) == pytest.approx(0.3)
    assert M.vqa_accuracy_from_answers("yes", ["no"] * 10) == 0.0


def test_vqa_answer_normalization_official_rules():
    assert M.normalize_answer("Two") == "2"  # number words to digits
    assert M.normalize_answer("the red-white one!") == "red white 1"  # punctuation to spaces, articles dropped
    assert M.normalize_answer("3,000") == "3000"  # a digit comma digit: punctuation removed, not spaced
    assert M.normalize_answer("yes .") == "yes"
    assert M.normalize_answer("1.5") == "1.5"  # a period before a digit stays
    # 3 of 10 say "2": each of those 3 sees 2 others agree (2/3), the other 7 see 3 (1) -> 0.9
    assert M.vqa_accuracy_from_answers("Two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7) / 10)


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


def test_retrieval_recall_at_1_5_10_hand_case():
    # 12 images x 12 texts, s[i, j] = -((j - i) mod 12): in row i text i ranks first, then i + 1 ...;
    # in column j image j ranks first, then j - 1 ... Text j belongs to image (j - r_j) mod 12,
    # so its image sits at rank r_j (t2i) and image i's best text at rank min r_j of its texts (i2t).
    n = 12
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    scores = -((j - i) % n).float()
    r = [0, 3, 7, 11, 0, 2, 4, 9, 1, 5, 6, 10]
    owner = [(k - r[k]) % n for k in range(n)]
    assert owner == [0, 10, 7, 4, 4, 3, 2, 10, 7, 4, 4, 1]
    res = M.retrieval_recall(scores, owner)  # ks = 1, 5, 10
    # t2i ranks r: < 1 for 2 texts, < 5 for 6, < 10 for 10
    assert (res["t2i_r1"], res["t2i_r5"], res["t2i_r10"]) == pytest.approx((2 / 12, 6 / 12, 10 / 12))
    # i2t over the 7 images with texts; best ranks: img0 0, img10 3, img7 1, img4 0, img3 2, img2 4, img1 10
    assert (res["i2t_r1"], res["i2t_r5"], res["i2t_r10"]) == pytest.approx((2 / 7, 6 / 7, 6 / 7))
    assert res["rsum"] == pytest.approx(100 * (2 / 12 + 6 / 12 + 10 / 12 + 2 / 7 + 6 / 7 + 6 / 7))


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
