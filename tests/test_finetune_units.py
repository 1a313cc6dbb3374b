"""Fine-tuning units: beam search with/without the KV cache, optimizer groups (layer-wise lr decay,
head lr scale), EMA, losses, the detection feature adapter, config validation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from beit3.data_pipeline.tokenizer import BOS_ID, EOS_ID, PAD_ID
from beit3.finetune.config import FinetuneConfig, FinetuneConfigError
from beit3.finetune.ema import EMA
from beit3.finetune.generation import GenerationConfig, SpecialIds, beam_search
from beit3.finetune.heads import CaptioningModel, ImageClassifier, VisionFeatureExtractor
from beit3.finetune.losses import Mixup, MixupConfig, contrastive_loss, one_hot_smoothed, vqa_loss
from beit3.finetune.train import optimizer_groups
from beit3.model.config import ConfigError, get_config
from beit3.model.config_io import load_config

VOCAB = 40
MASK = VOCAB - 1


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def captioner():
    torch.manual_seed(0)
    model = CaptioningModel(get_config("tiny", vocab_size=VOCAB)).eval()
    with torch.no_grad():  # a random model that ends captions at varied lengths
        model.mlm_head.weight.mul_(20)
        model.mlm_head.bias[EOS_ID] += 0.5
    return model


def _ids() -> SpecialIds:
    return SpecialIds(bos=BOS_ID, eos=EOS_ID, pad=PAD_ID, mask=MASK, vocab_size=VOCAB)


def test_beam_search_same_sequences_with_and_without_kv_cache(captioner):
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cfg = dict(num_beams=3, length_penalty=0.6, max_len=10)
    cached = beam_search(captioner, images, _ids(), GenerationConfig(**cfg, use_cache=True))
    full = beam_search(captioner, images, _ids(), GenerationConfig(**cfg, use_cache=False))
    assert [s for s, _ in cached] == [s for s, _ in full]
    assert [sc for _, sc in cached] == pytest.approx([sc for _, sc in full], abs=1e-4)
    lengths = {len(s) for s, _ in cached}
    assert len(lengths) > 1 and min(lengths) < 10  # some captions ended by EOS, not all at max_len
    banned = {BOS_ID, PAD_ID, MASK}
    assert all(t not in banned and t != EOS_ID for s, _ in cached for t in s)


def test_one_beam_is_greedy_decoding_by_full_recompute(captioner):
    """Reference decoder written out: append a mask token, read its logits, take the argmax."""
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = beam_search(captioner, images, _ids(), GenerationConfig(num_beams=1, max_len=8, use_cache=True))
    for b in range(2):
        seq: list[int] = []
        with torch.no_grad():
            for _ in range(8):
                text = torch.tensor([[BOS_ID, *seq, MASK]])
                out = captioner.beit3(images=images[b:b + 1], text_ids=text, causal_text=True)
                logits = captioner.mlm_head(out.hidden[:, -1])[0]
                logits[[BOS_ID, PAD_ID, MASK]] = float("-inf")
                tok = int(logits.argmax())
                if tok == EOS_ID:
                    break
                seq.append(tok)
        assert got[b][0] == seq


class _OfficialBeamHypotheses:
    """unilm's ``utils.BeamHypotheses`` as the BEiT-3 release uses it, written out."""

    def __init__(self, n_hyp, max_len, length_penalty):
        self.max_len, self.length_penalty, self.n_hyp = max_len - 1, length_penalty, n_hyp
        self.hyp, self.worst_score = [], 1e9

    def add(self, hyp, sum_logprobs):
        score = sum_logprobs / len(hyp) ** self.length_penalty
        if len(self.hyp) < self.n_hyp or score > self.worst_score:
            self.hyp.append((score, hyp))
            if len(self.hyp) > self.n_hyp:
                sorted_scores = sorted([(s, idx) for idx, (s, _) in enumerate(self.hyp)])
                del self.hyp[sorted_scores[0][1]]
                self.worst_score = sorted_scores[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs):
        return len(self.hyp) >= self.n_hyp and self.worst_score >= best_sum_logprobs / self.max_len ** self.length_penalty


def _official_eval_batch(model, image, num_beams, max_len, length_penalty):
    """The release's ``CaptioningHandler.eval_batch`` (engine_for_finetuning.py), its control flow
    step for step, with a full forward instead of the incremental state; token ids per image."""
    B, V, topn = image.shape[0], VOCAB, 3
    decoding_results = torch.full((B * num_beams, max_len), MASK, dtype=torch.long)
    decoding_results[:, 0] = BOS_ID
    generated_hyps = [_OfficialBeamHypotheses(1, max_len, length_penalty) for _ in range(B)]
    beam_scores = torch.zeros(B, num_beams)
    beam_scores[:, 1:] = -1e9
    beam_scores = beam_scores.view(-1)
    done = [False] * B
    images = image.repeat_interleave(num_beams, dim=0)
    cur_len = 2
    while cur_len <= max_len:
        text = torch.cat([decoding_results[:, :cur_len - 1], torch.full((B * num_beams, 1), MASK)], dim=1)
        with torch.no_grad():
            out = model.beit3(images=images, text_ids=text, causal_text=True)
            scores = F.log_softmax(model.mlm_head(out.hidden[:, -1]).float(), dim=-1)
        _scores = (scores + beam_scores[:, None]).view(B, num_beams * V)
        next_scores, next_words = torch.topk(_scores, topn * num_beams, dim=1, largest=True, sorted=True)
        next_batch_beam = []
        for b in range(B):
            done[b] = done[b] or generated_hyps[b].is_done(next_scores[b].max().item())
            if done[b]:
                next_batch_beam.extend([(0, PAD_ID, 0)] * num_beams)
                continue
            next_sent_beam = []
            for idx, score in zip(next_words[b], next_scores[b]):
                beam_id, word_id = int(idx) // V, int(idx) % V
                if (word_id == EOS_ID and cur_len + 1 <= max_len) or cur_len + 1 == max_len:
                    generated_hyps[b].add(decoding_results[b * num_beams + beam_id, :cur_len].clone(), score.item())
                else:
                    next_sent_beam.append((score, word_id, b * num_beams + beam_id))
                if len(next_sent_beam) == num_beams:
                    break
            if len(next_sent_beam) == 0:
                next_sent_beam = [(0, PAD_ID, 0)] * num_beams
            next_batch_beam.extend(next_sent_beam)
        beam_scores = torch.tensor([float(x[0]) for x in next_batch_beam])
        beam_words = torch.tensor([x[1] for x in next_batch_beam])
        beam_idx = torch.tensor([x[2] for x in next_batch_beam])
        decoding_results = decoding_results[beam_idx, :]
        decoding_results[:, cur_len - 1] = beam_words
        cur_len += 1
        if all(done):
            break
    special = {BOS_ID, EOS_ID, PAD_ID, MASK}
    return [[t for t in max(h.hyp, key=lambda x: x[0])[1].tolist() if t not in special] for h in generated_hyps]


@pytest.mark.parametrize("eos_bias", [-3.0, -0.5, 0.0])
def test_official_style_decoding_equals_the_release_step_for_step(captioner, eos_bias):
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        captioner.mlm_head.bias[EOS_ID] += eos_bias
    try:
        want = _official_eval_batch(captioner, images, num_beams=3, max_len=9, length_penalty=0.6)
        for use_cache in (True, False):
            cfg = GenerationConfig(num_beams=3, max_len=9, length_penalty=0.6, style="official", use_cache=use_cache)
            assert [seq for seq, _ in beam_search(captioner, images, _ids(), cfg)] == want, (eos_bias, use_cache)
    finally:
        with torch.no_grad():
            captioner.mlm_head.bias[EOS_ID] -= eos_bias
    lengths = {len(seq) for seq in want}  # -3: every caption ended by the max_len rule; 0: by EOS at varied steps
    assert max(lengths) <= 9 - 3 and (len(lengths) > 1 if eos_bias == 0.0 else True)


def _cfg(*overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, ["model.preset=tiny", *overrides])


def test_layer_decay_and_head_lr_scale():
    cfg = _cfg("optim.lr=1.0", "train.layer_decay=0.5", "train.head_lr_scale=10")
    model = ImageClassifier(cfg.model.backbone_config("classification"), 5)
    lr_of = {}
    for g in optimizer_groups(model, cfg):
        for p in g["params"]:
            lr_of[id(p)] = (g["lr"], g["weight_decay"])
    named = dict(model.named_parameters())
    L = model.config.depth  # 2: embeddings 0.5^3, block i 0.5^(2 - i), heads 1 x 10
    assert lr_of[id(named["beit3.vision_embed.proj.weight"])] == (0.5 ** (L + 1), 0.05)
    assert lr_of[id(named["beit3.vision_pos.weight"])][0] == 0.5 ** (L + 1)
    assert lr_of[id(named["beit3.blocks.0.ffn.vision.fc1.weight"])] == (0.5 ** L, 0.05)
    assert lr_of[id(named["beit3.blocks.1.attn.qkv.vision.weight"])] == (0.5, 0.05)
    assert lr_of[id(named["beit3.blocks.1.attn.qkv.vision.bias"])] == (0.5, 0.0)
    assert lr_of[id(named["head.weight"])] == (10.0, 0.05)
    assert lr_of[id(named["fc_norm.weight"])] == (10.0, 0.0)
    assert lr_of[id(named["beit3.vision_embed.cls_token"])][1] == 0.0  # no_weight_decay names
    assert len(lr_of) == len(named)
    # layer_decay 1 and head scale 1: one lr for all
    flat = optimizer_groups(model, _cfg("optim.lr=1.0", "train.layer_decay=1.0"))
    assert {g["lr"] for g in flat} == {1.0}


def test_ema_hand_values_and_swap():
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = EMA(lin, decay=0.5)
    for value in (3.0, 5.0):
        with torch.no_grad():
            lin.weight.fill_(value)
        ema.update(lin)
    # 0.5 * (0.5 * 1 + 0.5 * 3) + 0.5 * 5 = 3.5
    assert ema.shadow["weight"].item() == pytest.approx(3.5)
    with ema.applied(lin):
        assert lin.weight.item() == pytest.approx(3.5)
    assert lin.weight.item() == 5.0
    restored = EMA(lin, decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.shadow["weight"].item() == pytest.approx(3.5)


def test_contrastive_loss_hand_formula():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    loss, logits = contrastive_loss(img, txt, torch.tensor(math.log(10.0)))
    sim = 10.0 * img @ txt.t()
    want = 0.0
    for i in range(5):  # -log softmax of the diagonal, both directions, averaged
        want += -torch.log_softmax(sim[i], 0)[i] - torch.log_softmax(sim[:, i], 0)[i]
    assert loss.item() == pytest.approx(want.item() / 10, rel=1e-5)
    assert torch.allclose(logits, sim)
    # the temperature is clamped at 100
    big, _ = contrastive_loss(img, txt, torch.tensor(math.log(1000.0)))
    capped, _ = contrastive_loss(img, txt, torch.tensor(math.log(100.0)))
    assert big.item() == pytest.approx(capped.item())


def test_vqa_loss_and_label_smoothing_hand_values():
    logits = torch.tensor([[0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.3]])
    # BCE at logit 0 is log 2 for any target; mean over entries x number of answers (2)
    assert vqa_loss(logits, targets).item() == pytest.approx(2 * math.log(2))
    sm = one_hot_smoothed(torch.tensor([2]), 4, smoothing=0.2)
    assert sm[0].tolist() == pytest.approx([0.05, 0.05, 0.85, 0.05])


def test_mixup_and_cutmix_targets_match_the_mixed_area():
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    labels = torch.tensor([0, 1])
    mixed, t = Mixup(MixupConfig(mixup_alpha=1.0), 2, seed=0)(images, labels)
    lam = t[0, 0].item()  # image 0 keeps lam of itself, gets 1 - lam of image 1
    assert mixed[0].mean().item() == pytest.approx(1 - lam, abs=1e-6)
    assert t.sum(1).tolist() == pytest.approx([1.0, 1.0])
    cut, tc = Mixup(MixupConfig(cutmix_alpha=1.0), 2, seed=3)(images, labels)
    assert cut[0].mean().item() == pytest.approx(tc[0, 1].item(), abs=1e-6)  # pasted area fraction
    with pytest.raises(ConfigError, match="mixup.prob"):
        MixupConfig(prob=2.0)


def test_vision_feature_extractor_maps():
    from beit3.model.beit3 import BEiT3

    backbone = BEiT3(get_config("tiny", img_size=64, depth=4))
    feats = VisionFeatureExtractor(backbone, pyramid=True)(torch.randn(2, 3, 64, 64))
    # patch 8 on 64 px: grid 8; pyramid strides 2, 4, 8, 16 -> 32, 16, 8, 4
    assert [tuple(v.shape) for v in feats.values()] == [(2, 64, 32, 32), (2, 64, 16, 16), (2, 64, 8, 8), (2, 64, 4, 4)]


@pytest.mark.parametrize("overrides,task,eval_only,field", [
    (["data.train_index=x"], "vqa", False, "data.answer_vocab"),
    ([], "retrieval", False, "data.train_index"),
    (["data.eval_index=x", "data.spm=s", "data.classes=c"], "zeroshot", False, "task"),
    (["data.train_index=x", "train.layer_decay=1.5"], "retrieval", False, "train.layer_decay"),
    (["data.train_index=x", "mixup.mixup_alpha=0.8"], "retrieval", False, "mixup"),
    (["data.train_index=x"], "captioning", False, "data.spm"),
    (["data.train_index=x", "train.ema_decay=0.9", "run.deepspeed_config=finetune_zero3.json"], "retrieval", False,
     "train.ema_decay"),
    (["data.train_index=x", "run.deepspeed_config=nope.json"], "retrieval", False, "run.deepspeed_config"),
])
def test_config_fails_naming_the_field(overrides, task, eval_only, field):
    with pytest.raises(FinetuneConfigError, match=field):
        _cfg(*overrides).validate(task, eval_only)


def test_unknown_config_key_is_rejected():
    with pytest.raises(ConfigError, match="train.layer_decayy"):
        _cfg("train.layer_decayy=0.9")
    # a partial optim section keeps the fine-tuning defaults, not pretraining's 10k warmup steps
    assert _cfg("optim.lr=1e-4").optim.warmup_steps == 0


@pytest.mark.parametrize("old,new", [("train.output_dir=x", "run.output_dir"), ("train.resume=true", "run.resume"),
                                     ("train.keep_checkpoints=3", "run.keep_last"),
                                     ("train.save_every_steps=5", "run.save_every")])
def test_a_run_key_from_before_the_shared_section_names_its_new_place(old, new):
    with pytest.raises(ConfigError, match=f"{old.split('=')[0]}: moved to {new}"):
        _cfg(old)


@pytest.mark.parametrize("item,field", [("run.save_every=-1", "run.save_every"), ("run.keep_last=0", "run.keep_last"),
                                        ("run.save_every_epochs=0", "run.save_every_epochs"),
                                        ("run.resume=", "run.resume"), ("run.dist_timeout_s=0", "run.dist_timeout_s")])
def test_the_shared_run_section_validates_fine_tuning_values(item, field):
    with pytest.raises(ConfigError, match=field):
        _cfg(item)
