"""Host waits of the training step, counted (``runtime.host_syncs``): the counter itself, the
host-planned packed layout, and the bound on a real 2-rank ZeRO-3 step (``testing/step_syncs.py``, the run ``bench/host_syncs.py`` prints)."""
from __future__ import annotations

import pytest
import torch

from beit3.model import BEiT3ForPretraining, get_config
from beit3.model.packed import SourceBatch, packed_forward, plan_layout
from beit3.runtime.host_syncs import HostSyncCounter, host_side


def test_counter_counts_each_kind_of_wait_and_skips_host_side_work():
    x = torch.randn(4, 5)
    m = x > 0
    with HostSyncCounter() as c:
        c.mark("s")
        float(x.sum()), int(x.argmax()), bool(m.any())  # 3 scalar reads
        x[m]  # boolean index
        m.nonzero()
        x.tolist()
        x.index_select(0, torch.tensor([1, 2]))  # a device-side gather: no wait
        x[:, 1] * 2
        with host_side():  # host tensors on purpose: not counted
            m.nonzero(), float(x.sum()), x.tolist()
    kinds = {k.rsplit(" ", 1)[1]: n for k, n in c.counts["s"].items()}
    assert kinds == {"item": 3, "bool_index": 1, "nonzero": 1, "tolist": 1} and c.total("s") == 6
    assert torch.Tensor.tolist.__name__ == "tolist"  # the patch is undone


def _sources(cfg, g):
    B, P, L = 3, cfg.num_patches, 9
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, 2:] = True
    text_mask = (torch.rand(B, L, generator=g) < 0.5) & ~pad
    image = SourceBatch(images=torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=g),
                        image_mask=torch.rand(2, P, generator=g) < 0.4)
    text = SourceBatch(text_ids=torch.randint(3, cfg.vocab_size, (B, L), generator=g), padding_mask=pad,
                       text_mask=text_mask)
    pair = SourceBatch(images=torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g),
                       image_mask=torch.rand(B, P, generator=g) < 0.4,
                       text_ids=torch.randint(3, cfg.vocab_size, (B, L), generator=g), padding_mask=pad.flip(0),
                       text_mask=text_mask.flip(0))
    return image, text, pair


def test_host_planned_layout_gives_the_same_forward_with_no_wait_inside_it():
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = BEiT3ForPretraining(cfg).eval()
    image, text, pair = _sources(cfg, torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = packed_forward(model, image, text, pair)  # layout planned inside, from the tensors given
        with HostSyncCounter() as c:
            with host_side():
                lay = plan_layout(cfg, image, text, pair).to(torch.device("cpu"))
            c.mark("forward")
            got = packed_forward(model, image, text, pair, layout=lay)
    assert c.total("forward") == 0, dict(c.counts["forward"])
    assert torch.equal(ref.mim_logits, got.mim_logits) and torch.equal(ref.mlm_logits, got.mlm_logits)
    assert ref.mim_counts == got.mim_counts and ref.mlm_counts == got.mlm_counts
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        plan_layout(cfg, pair=SourceBatch(images=pair.images, image_mask=pair.image_mask, text_ids=pair.text_ids[:2],
                                          padding_mask=pair.padding_mask[:2], text_mask=pair.text_mask[:2]))


@pytest.mark.distributed
def test_a_zero3_step_waits_for_the_device_at_most_twice(tmp_path):
    """2 ranks, ZeRO-3 bf16, 2 micro-steps per optimizer step, the CUDA optimizer (fused AdamW), no
    logging step: every wait left comes from DeepSpeed's skip decision and the agreed stop flag."""
    from beit3.testing.step_syncs import WARMUP, measure

    per_rank = measure(steps=WARMUP + 3, accum=2, work=tmp_path)
    for counts in per_rank:
        for step in range(WARMUP + 1, WARMUP + 3):
            seg = counts[f"step{step}"]
            assert sum(seg.values()) <= 2, seg
            assert set(seg) <= {"deepspeed/runtime/utils.py:is_invalid_grad_norm item",
                                "runtime/checkpointing.py:all_ranks_true item"}, seg
