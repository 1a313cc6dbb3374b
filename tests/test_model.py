"""Unit tests of the Multiway Transformer: presets, modes, gradients, masks, hooks, config errors."""
import pytest
import torch

from beit3.model import BEiT3, BEiT3ForPretraining, ConfigError, Modality, get_config
from beit3.model.attention import attention, math_attention, sdpa_attention
from beit3.model.beit3 import KVCache
from beit3.model.config import BEiT3Config

LAYOUTS = ["released", "paper"]


def _inputs(cfg, B=3, L=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g)
    text = torch.randint(4, 1000, (B, L), generator=g)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1:2, 6:] = True
    pad[2:3, 3:] = True
    return images, text, pad


def _meta_params(cfg: BEiT3Config) -> int:
    with torch.device("meta"):
        return BEiT3(cfg).num_params()


def test_released_parameter_counts_match_official():
    assert _meta_params(get_config("base")) == 220_987_392
    assert _meta_params(get_config("large")) == 672_702_464


def test_giant_paper_layout_matches_paper_breakdown():
    cfg = get_config("giant")
    assert (cfg.layout, cfg.depth, cfg.embed_dim, cfg.ffn_dim, cfg.num_heads, cfg.patch_size, cfg.num_vl_layers) == \
        ("paper", 40, 1408, 6144, 16, 14, 3)
    with torch.device("meta"):
        m = BEiT3(cfg)
    count = lambda pred: sum(p.numel() for n, p in m.named_parameters() if pred(n))  # noqa: E731
    ffn_v = count(lambda n: ".ffn.vision." in n)
    ffn_l = count(lambda n: ".ffn.language." in n)
    ffn_vl = count(lambda n: ".ffn.vision_language." in n)
    attn = count(lambda n: ".attn." in n and "norm" not in n)
    # paper: V-FFN 692M, L-FFN 692M, VL-FFN 52M, shared attention 317M, 1.9B in all
    assert round(ffn_v / 1e6) == 693 and round(ffn_l / 1e6) == 693
    assert round(ffn_vl / 1e6) == 52
    assert round(attn / 1e6) == 317
    # 1.848B with the 64010-row text embedding; the paper rounds its total to 1.9B
    assert 1.8e9 < m.num_params() < 1.95e9


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward_all_modes(layout):
    cfg = get_config("tiny", layout=layout, vocab_size=1000, drop_path_rate=0.1)
    model = BEiT3(cfg).train()
    images, text, pad = _inputs(cfg)
    P = cfg.num_patches
    image_mask = torch.rand(3, P) < 0.4
    cases = {
        Modality.VISION: dict(images=images, image_mask=image_mask),
        Modality.TEXT: dict(text_ids=text, text_padding_mask=pad),
        Modality.FUSED: dict(images=images, text_ids=text, text_padding_mask=pad),
    }
    for modality, kwargs in cases.items():
        model.zero_grad()
        out = model(**kwargs)
        N = (P + 1 if "images" in kwargs else 0) + (text.shape[1] if "text_ids" in kwargs else 0)
        assert out.hidden.shape == (3, N, cfg.embed_dim)
        assert out.modality is modality
        assert out.split == (P + 1 if "images" in kwargs else 0)
        out.hidden.float().pow(2).mean().backward()
        assert torch.isfinite(out.hidden).all()


def _grad_names(model, **kwargs):
    model.zero_grad(set_to_none=True)
    model(**kwargs).hidden.sum().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_parameter_is_trained_by_the_right_mode(layout):
    torch.manual_seed(0)
    cfg = get_config("tiny", layout=layout, vocab_size=1000)
    model = BEiT3(cfg)
    images, text, pad = _inputs(cfg)
    mask = torch.zeros(3, cfg.num_patches, dtype=torch.bool)
    mask[:, :5] = True
    v = _grad_names(model, images=images, image_mask=mask)
    t = _grad_names(model, text_ids=text, text_padding_mask=pad)
    f = _grad_names(model, images=images, text_ids=text, text_padding_mask=pad, image_mask=mask)
    names = {n for n, _ in model.named_parameters()}
    assert v | t | f == names, f"never trained: {sorted(names - (v | t | f))}"
    assert not any(".language." in n or ".vision_language." in n for n in v)
    assert not any(".vision." in n or ".vision_language." in n or "vision_embed" in n for n in t)
    assert "vision_embed.mask_token" in v and "text_embed.weight" in t
    if layout == "paper":  # the fused sequence takes the VL expert in the top layer, and only there
        top = cfg.depth - 1
        assert any(n.startswith(f"blocks.{top}.ffn.vision_language.") for n in f)
        assert not any(n.startswith(f"blocks.{top}.ffn.vision.") for n in f)
        assert all(".vision_language." not in n for n in v | t)
        assert any(".attn.qkv.weight" in n for n in v) and any(".attn.qkv.weight" in n for n in t)
    else:
        assert all(".vision_language." not in n for n in names)


def test_padding_does_not_change_unpadded_outputs():
    cfg = get_config("tiny", vocab_size=1000)
    model = BEiT3(cfg).eval()
    images, text, _ = _inputs(cfg, B=1)
    short = model(images=images, text_ids=text[:, :5]).hidden
    padded_text = torch.cat([text[:, :5], torch.ones(1, 4, dtype=torch.long)], dim=1)
    pad = torch.zeros(1, 9, dtype=torch.bool)
    pad[:, 5:] = True
    long = model(images=images, text_ids=padded_text, text_padding_mask=pad).hidden
    torch.testing.assert_close(long[:, : short.shape[1]], short, atol=1e-5, rtol=1e-5)


def test_masked_patches_use_mask_token():
    cfg = get_config("tiny", vocab_size=1000)
    model = BEiT3(cfg).eval()
    a, _, _ = _inputs(cfg, B=1, seed=1)
    b, _, _ = _inputs(cfg, B=1, seed=2)
    mask = torch.ones(1, cfg.num_patches, dtype=torch.bool)  # every patch masked: image content is gone
    torch.testing.assert_close(model(images=a, image_mask=mask).hidden, model(images=b, image_mask=mask).hidden)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_captioning_mask_structured_equals_dense_and_kv_cache(layout):
    cfg = get_config("tiny", layout=layout, vocab_size=1000)
    model = BEiT3(cfg).eval()
    images, text, _ = _inputs(cfg, B=2)
    S, L = cfg.num_vision_tokens, text.shape[1]
    N = S + L
    dense = torch.zeros(N, N, dtype=torch.bool)
    dense[:S, S:] = True  # image tokens never see text
    dense[S:, S:] = torch.ones(L, L, dtype=torch.bool).triu(1)  # text sees leftward text
    structured = model(images=images, text_ids=text, causal_text=True).hidden
    torch.testing.assert_close(structured, model(images=images, text_ids=text, attn_mask=dense).hidden)
    cache = KVCache()
    parts = [model(images=images, text_ids=text[:, :4], causal_text=True, kv_cache=cache).hidden]
    parts.append(model(text_ids=text[:, 4:5], kv_cache=cache).hidden)
    parts.append(model(text_ids=text[:, 5:], kv_cache=cache).hidden)
    torch.testing.assert_close(torch.cat(parts, dim=1), structured, atol=1e-5, rtol=1e-5)
    assert cache.length == N and cache.text_length == L


def test_attention_backends_agree_and_fully_masked_rows_are_zero():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    pad[0] = True  # sample 0: no visible key at all
    for kwargs in (dict(), dict(key_padding_mask=pad), dict(prefix_len=3), dict(prefix_len=torch.tensor([0, 7])),
                   dict(key_padding_mask=pad, prefix_len=2)):
        ref = math_attention(q, k, v, **kwargs)
        torch.testing.assert_close(sdpa_attention(q, k, v, **kwargs), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(attention(q, k, v, backend="auto", **kwargs), ref, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(ref).all()
    assert math_attention(q, k, v, key_padding_mask=pad)[0].abs().max() == 0


def test_grad_checkpointing_gives_same_gradients():
    cfg = get_config("tiny", vocab_size=1000)
    torch.manual_seed(0)
    model = BEiT3(cfg).train()
    images, text, pad = _inputs(cfg)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(images=images, text_ids=text, text_padding_mask=pad).hidden.pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])


def test_no_weight_decay_names_exist_and_pretraining_heads():
    cfg = get_config("tiny", vocab_size=1000)
    model = BEiT3ForPretraining(cfg)
    names = {n for n, _ in model.named_parameters()}
    assert model.no_weight_decay() <= names
    images, text, pad = _inputs(cfg)
    image_mask = torch.zeros(3, cfg.num_patches, dtype=torch.bool)
    image_mask[:, ::3] = True
    text_mask = torch.zeros_like(pad)
    text_mask[:, 1] = True
    out = model(images=images, text_ids=text, text_padding_mask=pad, image_mask=image_mask, text_mask=text_mask)
    assert out.mim_logits.shape == (int(image_mask.sum()), cfg.num_visual_tokens)
    assert out.mlm_logits.shape == (3, cfg.vocab_size)


def test_flops_estimate_matches_counted_matmul_flops():
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_config("tiny", vocab_size=1000, attn_backend="math")  # counter sees math matmuls
    model = BEiT3(cfg).eval()
    images, text, _ = _inputs(cfg, B=1)
    with FlopCounterMode(display=False) as counter:
        model(images=images, text_ids=text)
    est = model.flops_per_sample(cfg.num_vision_tokens, text.shape[1], training=False)
    assert abs(counter.get_total_flops() - est) / est < 0.02


def test_image_size_mismatch_is_a_clear_error():
    cfg = get_config("tiny", vocab_size=1000)
    with pytest.raises(ValueError, match="img_size"):
        BEiT3(cfg)(images=torch.randn(1, 3, 48, 48))


@pytest.mark.parametrize("kwargs,field", [
    (dict(embed_dim=100, num_heads=12), "embed_dim"),
    (dict(layout="moe"), "layout"),
    (dict(img_size=230), "img_size"),
    (dict(num_vl_layers=2), "num_vl_layers"),
    (dict(drop_path_rate=1.5), "drop_path_rate"),
    (dict(attn_backend="flash"), "attn_backend"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        get_config("base", **kwargs)


def test_unknown_preset_and_unknown_key():
    with pytest.raises(ConfigError, match="preset"):
        get_config("huge")
    with pytest.raises(ConfigError, match="hidden_size"):
        BEiT3Config.from_dict({"hidden_size": 768})


def test_paper_layout_switch_adds_vl_layers():
    assert get_config("base", layout="paper").num_vl_layers == 2
    assert get_config("giant", layout="released").num_vl_layers == 0
