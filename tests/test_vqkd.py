"""VQ-KD tokenizer: shapes/dtypes, quantizer math against hand-computed cases, official layout."""
from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from beit3.model.config import ConfigError
from beit3.model.vqkd import (VQKD, VQKD_PRESETS, ClipVisionTeacher, NormEMAQuantizer, build_teacher,
                              config_from_state_dict, filter_official_state_dict, get_vqkd_config,
                              kmeans_cosine, load_tokenizer, save_tokenizer)


pytestmark = pytest.mark.usefixtures("one_thread")


def _trained_like(cfg_name: str = "tiny", seed: int = 0, **overrides) -> VQKD:
    """A tokenizer with random weights, nonzero q/v biases and an initialised random codebook."""
    torch.manual_seed(seed)
    m = VQKD(get_vqkd_config(cfg_name, **overrides))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("q_bias", "v_bias")):
                p.normal_(0, 0.1)
        m.quantize.embedding.weight.copy_(F.normalize(torch.randn_like(m.quantize.codebook), dim=-1))
        m.quantize.embedding.initted.fill_(1.0)
    return m.eval()


def test_config_validation_and_presets():
    cfg = get_vqkd_config("tiny")
    assert cfg.num_patches == 16 and cfg.grid_size == 4  # BEiT-3 tiny: 32 px / 8 -> 4x4
    base = VQKD_PRESETS["base"]
    assert (base.num_patches, base.num_codes, base.code_dim, base.decoder_depth) == (196, 8192, 32, 3)
    assert VQKD_PRESETS["base_1x768x12_dino"].teacher_dim == 768
    with pytest.raises(ConfigError, match="img_size"):
        get_vqkd_config("tiny", img_size=30)
    with pytest.raises(ConfigError, match="unknown key"):
        get_vqkd_config("tiny", codebook_size=3)
    with pytest.raises(ConfigError, match="preset"):
        get_vqkd_config("huge")


def test_shapes_dtypes_and_training_forward():
    m = VQKD(get_vqkd_config("tiny")).train()
    x = torch.rand(4, 3, 32, 32)
    teacher = torch.randn(4, 16, 64)
    out = m(x, teacher)
    assert out.codes.shape == (4, 16) and out.codes.dtype == torch.long
    assert out.counts.shape == (128,) and int(out.counts.sum()) == 64
    assert out.z.shape == (64, 16) and out.loss.ndim == 0
    assert bool(m.quantize.embedding.initted)  # k-means init ran on the first batch
    out.loss.backward()
    assert m.encoder.blocks[0].attn.qkv.weight.grad is not None  # straight-through reaches the encoder
    assert m.quantize.codebook.grad is None  # the codebook is EMA-only
    codes32 = m.codes(x)
    assert codes32.shape == (4, 16) and codes32.dtype == torch.long and m.training  # mode untouched
    codes_bf16 = m.codes(x, dtype=torch.bfloat16)
    assert codes_bf16.dtype == torch.long and codes_bf16.shape == (4, 16)
    with pytest.raises(ValueError, match="tokenizer expects images"):
        m.codes(torch.rand(4, 3, 64, 64))
    m.bfloat16()  # DeepSpeed bf16 casts the module: the codebook state stays fp32
    assert m.quantize.codebook.dtype == torch.float32 and m.quantize.cluster_size.dtype == torch.float32
    assert m.encoder.pos_embed.dtype == torch.bfloat16
    assert m.codes(x).shape == (4, 16)


def test_ema_update_hand_computed():
    q = NormEMAQuantizer(num_codes=3, code_dim=2, decay=0.5, beta=1.0, kmeans_init=False).train()
    q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    z = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]]])  # [B=1, N=3, D=2]; codes 0, 1, 0
    out = q(z)
    assert out.codes.tolist() == [[0, 1, 0]]
    assert out.counts.tolist() == [2.0, 1.0, 0.0]
    # code 0: mean of (1,0),(0.8,0.6) = (0.9,0.3) -> unit (0.948683, 0.316228); 0.5*old + 0.5*new
    # = (0.974342, 0.158114) -> unit (0.987087, 0.160182). code 1: 0.5*(0,1) + 0.5*(0.6,0.8) = (0.3,0.9)
    # -> (0.316228, 0.948683). code 2 unused: keeps (-1, 0).
    expected = torch.tensor([[0.987087, 0.160182], [0.316228, 0.948683], [-1.0, 0.0]])
    torch.testing.assert_close(q.codebook, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(q.cluster_size, torch.tensor([1.0, 0.5, 0.0]))
    # commitment loss uses the codebook BEFORE the update: z_q = (1,0),(0,1),(1,0)
    # squared errors: 0, 0.36+0.04, 0.04+0.36 -> mean over 6 entries = 0.8/6
    assert abs(float(out.loss) - 0.8 / 6) < 1e-6
    # eval mode: no update
    q.eval()
    before = q.codebook.clone()
    q(z)
    torch.testing.assert_close(q.codebook, before)


def test_kmeans_hand_computed():
    pts = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    init = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    means, counts = kmeans_cosine(pts, 3, num_iters=2, init=init)
    # clusters {p1,p2} and {p3,p4}: means (0.9,0.3) and (-0.3,0.9), normalised; the third is empty
    expected = torch.tensor([[0.948683, 0.316228], [-0.316228, 0.948683], [0.0, -1.0]])
    torch.testing.assert_close(means, expected, atol=1e-5, rtol=0)
    assert counts.tolist() == [2.0, 2.0, 0.0]


def test_kmeans_init_on_first_batch():
    q = NormEMAQuantizer(num_codes=4, code_dim=2, decay=0.99, kmeans_init=True, kmeans_iters=10).train()
    assert not bool(q.embedding.initted) and float(q.codebook.abs().sum()) == 0
    angles = torch.tensor([0.0, 0.05, 1.6, 1.65, 3.2, 3.25, 4.7, 4.75])  # four tight pairs
    z = torch.stack([angles.cos(), angles.sin()], -1)[None]  # [1, 8, 2]
    q.update = False  # look at the k-means result itself
    out = q(z)
    assert bool(q.embedding.initted)
    ref, _ = kmeans_cosine(z[0], 4, 10, generator=torch.Generator().manual_seed(0))  # documented seed 0
    torch.testing.assert_close(q.codebook, ref)
    assert sorted(out.codes[0].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]  # each pair -> its own code
    assert torch.equal(out.codes[0, ::2], out.codes[0, 1::2])
    torch.testing.assert_close(q.codebook.norm(dim=-1), torch.ones(4))


def test_reseed_dead_codes():
    q = NormEMAQuantizer(num_codes=4, code_dim=2, kmeans_init=False)
    pool = F.normalize(torch.randn(10, 2), dim=-1)
    dead = torch.tensor([False, True, False, True])
    old = q.codebook.clone()
    assert q.reseed_(dead, pool, seed=1) == 2
    assert torch.equal(q.codebook[[0, 2]], old[[0, 2]])
    for row in q.codebook[[1, 3]]:  # every re-seeded code is one of the pool vectors
        assert torch.isclose(pool @ row, torch.tensor(1.0), atol=1e-6).any()


def _timm_reference_codes(state: dict[str, torch.Tensor], cfg, images: torch.Tensor) -> torch.Tensor:
    """Codes by an independent path: timm 0.6's ViT (what BEiT v2 builds on) loaded from the
    official keys, and the official quantizer's squared-distance argmin."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    vit = TimmViT(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
                  num_heads=cfg.num_heads, qkv_bias=True, num_classes=0, global_pool="avg",
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
    enc = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    for i in range(cfg.depth):
        q_bias, v_bias = enc.pop(f"blocks.{i}.attn.q_bias"), enc.pop(f"blocks.{i}.attn.v_bias")
        enc[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
    vit.load_state_dict(enc, strict=True)
    vit.eval()
    with torch.no_grad():
        x = images * 255.0 / 127.5 - 1.0
        tokens = vit.forward_features(x)  # [B, 1+P, D]; timm's final norm is Identity with fc_norm
        feats = vit.fc_norm(tokens[:, 1:])
        h = torch.tanh(F.linear(feats, state["encode_task_layer.0.weight"], state["encode_task_layer.0.bias"]))
        z = F.normalize(F.linear(h, state["encode_task_layer.2.weight"], state["encode_task_layer.2.bias"]), dim=-1)
        e = state["quantize.embedding.weight"]
        d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(1) - 2 * torch.einsum("bnd,kd->bnk", z, e)
        return d.argmin(-1)


def test_official_checkpoint_codes_match_reference(tmp_path):
    model = _trained_like("tiny")
    sd = model.state_dict()
    official = {"model": {**sd, "loss.weight": torch.zeros(1), "teacher_model.visual.proj": torch.zeros(2, 2),
                          "scaling_layer.shift": torch.zeros(1, 3, 1, 1)}, "epoch": 99}
    path = tmp_path / "vqkd_official.pth"
    torch.save(official, path)
    loaded = load_tokenizer(str(path), num_heads=4, decoder_num_heads=4)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = torch.rand(6, 3, 32, 32)
    ref = _timm_reference_codes(filter_official_state_dict(official), loaded.config, images)
    got = loaded.codes(images, dtype=torch.float32)
    assert torch.equal(got, ref)
    assert torch.equal(got, model.codes(images, dtype=torch.float32))
    # our own file format round trip
    save_tokenizer(loaded, str(tmp_path / "ours.pt"))
    again = load_tokenizer(str(tmp_path / "ours.pt"))
    assert torch.equal(again.codes(images, dtype=torch.float32), got)
    # dropped prefixes, strictness
    assert not any(k.startswith(("loss", "teacher", "scaling")) for k in filter_official_state_dict(official))
    broken = dict(official["model"])
    broken.pop("encoder.fc_norm.weight")
    with pytest.raises(ValueError, match="missing"):
        load_tokenizer({"model": broken}, num_heads=4, decoder_num_heads=4)


def test_base_official_key_layout_round_trip():
    model = VQKD(VQKD_PRESETS["base"])
    sd = model.state_dict()
    shapes = {
        "encoder.pos_embed": (1, 197, 768), "encoder.cls_token": (1, 1, 768),
        "encoder.patch_embed.proj.weight": (768, 3, 16, 16), "encoder.blocks.0.attn.qkv.weight": (2304, 768),
        "encoder.blocks.0.attn.q_bias": (768,), "encoder.blocks.0.attn.v_bias": (768,),
        "encoder.blocks.11.mlp.fc2.weight": (768, 3072), "encoder.fc_norm.weight": (768,),
        "decoder.patch_embed.proj.weight": (768, 32, 1, 1), "decoder.pos_embed": (1, 197, 768),
        "decoder.blocks.2.norm1.weight": (768,), "quantize.embedding.weight": (8192, 32),
        "quantize.embedding.cluster_size": (8192,), "quantize.embedding.embed_avg": (8192, 32),
        "quantize.embedding.initted": (1,), "quantize.cluster_size": (8192,),
        "encode_task_layer.0.weight": (768, 768), "encode_task_layer.2.weight": (32, 768),
        "decode_task_layer.2.weight": (512, 768),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(".k_bias" in k or k.startswith("encoder.norm.") or k.startswith("encoder.head") for k in sd)
    assert config_from_state_dict(sd) == VQKD_PRESETS["base"]
    assert config_from_state_dict({k: v for k, v in sd.items() if not k.startswith("decoder.blocks.1")
                                   and not k.startswith("decoder.blocks.2")}) == VQKD_PRESETS["base_1x768x12_clip"]
    sd["quantize.embedding.initted"].fill_(1.0)
    loaded = load_tokenizer({"model": dict(sd)})  # strict: every key of the layout is consumed
    assert set(loaded.state_dict()) == set(sd)


def test_clip_teacher_from_full_clip_state_dict():
    torch.manual_seed(0)
    visual = ClipVisionTeacher(32, 8, 64, 2, 1, 48)  # OpenAI CLIP: heads = width // 64
    full = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    full.update({"token_embedding.weight": torch.zeros(10, 8), "positional_embedding": torch.zeros(77, 8),
                 "ln_final.weight": torch.ones(8), "logit_scale": torch.tensor(1.0)})
    teacher = build_teacher("clip", full)
    x = torch.rand(2, 3, 32, 32)
    feats = teacher(x)
    assert feats.shape == (2, 16, 48) and teacher.out_dim == 48
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    torch.testing.assert_close(feats, visual((x - mean) / std))  # CLIP normalisation applied
    with pytest.raises(ConfigError, match="teacher kind"):
        build_teacher("resnet", full)


def test_dino_teacher_matches_timm_vit():
    """A DINO/timm ViT state dict (timm 0.6 keys) loads as a teacher; features = timm's final
    norm of the patch tokens after ImageNet normalisation."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    vit = TimmViT(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    state = {**vit.state_dict(), "head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)}
    teacher = build_teacher("dino", state)
    assert teacher.out_dim == 64 and not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = vit.forward_features((x - mean) / std)[:, 1:]
    torch.testing.assert_close(teacher(x), ref, atol=1e-5, rtol=1e-5)


def test_beit3_teacher_from_project_checkpoint():
    """The vision path of this project's own BEiT-3 checkpoint (keys ``beit3.*``) as a teacher."""
    from beit3.model.beit3 import BEiT3
    from beit3.model.config import get_config

    torch.manual_seed(0)
    backbone = BEiT3(get_config("tiny")).eval()
    ckpt = {f"beit3.{k}": v for k, v in backbone.state_dict().items()}
    ckpt["mim_head.weight"] = torch.zeros(3, 3)  # other heads of a pretraining checkpoint are ignored
    teacher = build_teacher("beit3", ckpt, beit3_preset="tiny")
    x = torch.rand(2, 3, 32, 32)
    feats = teacher(x)
    assert feats.shape == (2, 16, 64) and teacher.out_dim == 64
    with torch.no_grad():
        ref = backbone(images=x * 2 - 1).vision[:, 1:]  # mean = std = 0.5
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_codes_on_cuda_default_to_fp32_and_bf16_agrees_on_most():
    """GPU only (not run on the CPU CI): the default codes dtype is fp32 (bf16 agrees on < 99.5%),
    the result is long on the device, and bf16 codes agree with fp32 on most patches."""
    from beit3.model.vqkd import default_codes_dtype

    device = torch.device("cuda")
    assert default_codes_dtype(device) == torch.float32
    m = _trained_like("tiny").to(device)
    x = torch.rand(16, 3, 32, 32, device=device)
    codes = m.codes(x)
    assert codes.dtype == torch.long and codes.device.type == "cuda" and codes.shape == (16, 16)
    agree = (codes == m.codes(x, dtype=torch.bfloat16)).float().mean()
    assert agree > 0.9, float(agree)  # CPU bf16 autocast: 99.3-99.5% on this case
