"""The packed, padding-free single-pass forward (model/packed.py) against the three-pass objective."""
import pytest
import torch
import torch.nn as nn

from beit3.model import BEiT3ForPretraining, get_config
from beit3.model.packed import SourceBatch, packed_forward
from beit3.pretrain.objective import mdm_loss, real_token_flops, three_pass_mdm_loss
from beit3.testing.batches import random_micro_batch as make_batch
from beit3.testing.jobs import launch, metrics, overrides

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(layout="released", **kw):
    torch.manual_seed(0)
    return BEiT3ForPretraining(get_config("tiny", vocab_size=300, num_visual_tokens=64, layout=layout, **kw))


def loss_and_grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    r = fn(model, batch, None, CPU)
    r.loss.backward()
    return r, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["released", "paper"])
def test_packed_loss_and_every_gradient_equal_three_pass(layout):
    model = tiny(layout)
    batch = make_batch(model.config)
    ref, ref_grads = loss_and_grads(model, three_pass_mdm_loss, batch)
    got, grads = loss_and_grads(model, mdm_loss, batch)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    for name, g in ref_grads.items():
        assert g is not None and grads[name] is not None, name
        rel = ((grads[name] - g).norm() / g.norm().clamp_min(1e-12)).item()
        assert rel < 1e-5, (name, rel)
    ref_m, got_m = ref.metrics(), got.metrics()
    assert list(got_m) == list(ref_m)  # same per-part names (image/mim, text/mlm, pair/mim, pair/mlm, ...)
    for k, v in ref_m.items():
        assert got_m[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert got.flops == ref.flops == real_token_flops(model, batch)


def test_packed_equals_three_pass_with_checkpointing_and_in_eval():
    model = tiny("paper")
    batch = make_batch(model.config, seed=1)
    ref, ref_grads = loss_and_grads(model, mdm_loss, batch)
    model.set_grad_checkpointing(True)
    got, grads = loss_and_grads(model, mdm_loss, batch)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-8)
    model.eval()
    with torch.no_grad():
        assert mdm_loss(model, batch, None, CPU).loss.item() == pytest.approx(
            three_pass_mdm_loss(model, batch, None, CPU).loss.item(), rel=1e-5)


def _gemm_rows(model):
    """Rows fed to every nn.Linear / the patch conv in one forward, by module name."""
    rows, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: rows.__setitem__(name, rows.get(name, 0) + args[0].shape[:-1].numel())))
    return rows, hooks


def test_no_padding_token_goes_through_a_gemm():
    """COCO-like captions (10-30 tokens padded to 64): the packed pass feeds the language experts
    exactly the real tokens, the vision experts exactly the image tokens; the heads only masked rows."""
    model = tiny()
    cfg = model.config
    batch = make_batch(cfg, B=4, L=64, sources=("pair",))
    lens = torch.tensor([10, 17, 24, 30])
    pad = torch.arange(64)[None] >= lens[:, None]
    batch["pair"].update(padding_mask=pad, text_mask=batch["pair"]["text_mask"] & ~pad)
    rows, hooks = _gemm_rows(model)
    mdm_loss(model, batch, None, CPU)
    for h in hooks:
        h.remove()
    real, S = int(lens.sum()), cfg.num_vision_tokens
    assert rows["beit3.blocks.0.attn.qkv.language"] == real and rows["beit3.blocks.1.ffn.language.fc2"] == real
    assert rows["beit3.blocks.0.attn.qkv.vision"] == 4 * S
    assert rows["mlm_head"] == int(batch["pair"]["text_mask"].sum())
    assert rows["mim_head"] == int(batch["pair"]["image_mask"].sum())
    rows3, hooks = _gemm_rows(model)
    three_pass_mdm_loss(model, batch, None, CPU)
    for h in hooks:
        h.remove()
    assert rows3["beit3.blocks.0.attn.qkv.language"] == 4 * 64  # the baseline's padded GEMM rows
    # MFU accounting counts the real tokens only
    p = batch["pair"]
    assert real_token_flops(model, batch) == sum(
        model.flops_per_sample(S, int(n), num_masked_patches=int(p["image_mask"][i].sum()),
                               num_masked_text=int(p["text_mask"][i].sum())) for i, n in enumerate(lens))


def _call_order(model, batch):
    order, hooks = [], []
    for name, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name)))
    r = mdm_loss(model, batch, None, CPU)
    r.loss.backward()
    for h in hooks:
        h.remove()
    return order


@pytest.mark.parametrize("sources", [("image",), ("text",), ("pair",), ("image", "pair")])
def test_missing_source_calls_the_same_modules_in_the_same_order_and_grads_every_parameter(sources):
    """What ZeRO-3 needs when a rank's source is empty or disabled: identical module calls, every
    parameter with a gradient (zero where unused)."""
    model = tiny("paper")
    full = _call_order(model, make_batch(model.config))
    model.zero_grad(set_to_none=True)
    assert _call_order(model, make_batch(model.config, sources=sources)) == full
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert len(full) == len(set(full))  # each module (expert, head) called once per pass


def test_empty_text_rows_and_bad_inputs():
    model = tiny()
    batch = make_batch(model.config)
    t = batch["text"]
    t["padding_mask"][2] = True  # a text row of padding only: dropped from the packed texts
    t["text_mask"][2] = False
    got = mdm_loss(model, batch, None, CPU).loss.item()
    ref = three_pass_mdm_loss(model, batch, None, CPU).loss.item()
    assert got == pytest.approx(ref, rel=1e-5)
    t["text_mask"][2, 0] = True
    with pytest.raises(ValueError, match="text_mask selects padding"):
        mdm_loss(model, batch, None, CPU)
    with pytest.raises(ValueError, match="either sources"):
        model(images=batch["image"]["images"], sources={"image": SourceBatch(images=batch["image"]["images"])})
    with pytest.raises(ValueError, match="unknown source"):
        model(sources={"video": SourceBatch()})
    with pytest.raises(ValueError, match="at least one source"):
        packed_forward(model)
    with pytest.raises(ValueError, match="image source takes no text_ids"):
        packed_forward(model, image=SourceBatch(images=batch["image"]["images"], text_ids=t["text_ids"]))


@pytest.mark.slow
def test_one_packed_block_compiles_fullgraph_without_graph_breaks():
    """Inductor on CPU, tiny shapes: one packed block has no graph break and matches eager."""
    import torch._dynamo

    model = tiny("paper").eval()
    batch = make_batch(model.config, B=2, L=6)
    out = model(sources={s: _sb(v) for s, v in batch.items()})
    lay, block = out.layout, model.beit3.blocks[-1]
    x = torch.randn(lay.num_tokens, model.config.embed_dim)
    explain = torch._dynamo.explain(lambda h: block(h, packed=lay))(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(lambda h: block(h, packed=lay), fullgraph=True, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), block(x, packed=lay), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def _sb(src):
    from beit3.pretrain.objective import source_batch

    return source_batch(src)


@pytest.mark.distributed
@pytest.mark.parametrize("extra", [{"data.texts": 0}, {"run.stage": "vision"}],
                         ids=["no-texts", "stage-vision"])
def test_two_rank_zero3_with_a_disabled_source_does_not_hang(demo_data, tiny_tokenizer, tmp_path, extra):
    launch(2, overrides(demo_data, tiny_tokenizer, tmp_path, **{"run.max_steps": 2, **extra}), timeout=400)
    rows = metrics(tmp_path)
    assert sorted(rows) == [1, 2]
    assert "text/mlm_loss" not in rows[2] and "image/mim_loss" in rows[2]


@pytest.mark.slow
def test_model_compile_option_compiles_every_block_and_keeps_the_loss():
    """``model.compile: true`` (pretraining config): every block compiled in place, same packed loss."""
    import torch._dynamo

    from beit3.pretrain.train import ModelSection

    model = tiny()
    batch = make_batch(model.config, B=2, L=6)
    ref, ref_grads = loss_and_grads(model, mdm_loss, batch)
    ModelSection(preset="tiny", compile=True).apply(model)
    assert all(b._compiled_call_impl is not None for b in model.beit3.blocks)
    got, grads = loss_and_grads(model, mdm_loss, batch)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
