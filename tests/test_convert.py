"""Official-checkpoint adapter: parity with microsoft/torchscale, lossless round trip, resolution change."""
import pytest
import torch

from beit3.model import BEiT3, ConfigError, get_config
from beit3.model.convert import (backbone_state, infer_config, interpolate_vision_pos, load_pretrained,
                                 official_to_ours, ours_to_official)
from beit3.testing.official_reference import build_official, official_state, parity

pytest.importorskip("torchscale")


def test_parity_with_official_implementation_tiny():
    diffs = parity(get_config("tiny", vocab_size=1000), batch=3, text_len=9)
    for mode in ("vision", "text+padding", "fused+padding", "fused+captioning"):
        assert diffs[mode] < 1e-5, (mode, diffs)


@pytest.mark.slow
def test_parity_with_official_implementation_base_widths():
    # base widths (768/3072/12 heads, 224 px, 64010 vocab) at depth 2 to keep CI fast;
    # bench/parity.py measures the full 12-layer base and large
    diffs = parity(get_config("base", depth=2), batch=1, text_len=12)
    for mode in ("vision", "text+padding", "fused+padding", "fused+captioning"):
        assert diffs[mode] < 1e-4, (mode, diffs)


def test_official_round_trip_is_lossless_and_keys_are_official():
    cfg = get_config("tiny", vocab_size=1000)
    official = official_state(build_official(cfg))
    ours = official_to_ours(official, cfg)
    assert "beit3.blocks.0.attn.qkv.vision.weight" in ours and "beit3.norm.language.weight" in ours
    assert not any(".A." in k or ".B." in k for k in ours)
    back = ours_to_official(ours, cfg)
    assert back.keys() == official.keys()
    for k in official:
        assert torch.equal(back[k], official[k]), k
    assert "beit3.encoder.layers.0.self_attn.q_proj.A.weight" in back


def test_base_official_layout_has_491_keys():
    cfg = get_config("base")
    with torch.device("meta"):
        model = BEiT3(cfg)
    sd = ours_to_official({f"beit3.{k}": v for k, v in model.state_dict().items()}, cfg)
    assert len(sd) == 491
    assert sd["beit3.encoder.embed_positions.A.weight"].shape == (199, 768)
    assert sd["beit3.text_embed.weight"].shape == (64010, 768)


def test_heads_pass_through_and_load_pretrained_from_pth(tmp_path):
    cfg = get_config("tiny", vocab_size=1000)
    official = official_state(build_official(cfg))
    official["mim_head.weight"] = torch.randn(8192, cfg.embed_dim)
    official["mim_head.bias"] = torch.zeros(8192)
    path = tmp_path / "beit3_tiny.pth"
    torch.save({"model": official}, path)
    ours = load_pretrained(path, cfg)
    assert torch.equal(ours["mim_head.weight"], official["mim_head.weight"])
    BEiT3(cfg).load_state_dict(backbone_state(ours))
    inferred = infer_config(official, num_heads=cfg.num_heads)
    assert (inferred.embed_dim, inferred.depth, inferred.ffn_dim, inferred.img_size, inferred.patch_size) == \
        (cfg.embed_dim, cfg.depth, cfg.ffn_dim, cfg.img_size, cfg.patch_size)


def test_position_interpolation_to_other_resolutions():
    D = 8
    table = torch.randn(3 + 14 * 14, D)
    assert interpolate_vision_pos(table, 14 * 14) is table
    big = interpolate_vision_pos(table, 24 * 24)
    assert big.shape == (3 + 576, D)  # 579 rows at 384 px
    assert torch.equal(big[:3], table[:3])  # offset rows and CLS are kept
    # a ramp over the grid columns stays an increasing ramp at half the step
    grid = torch.arange(14.0).repeat(14, 1)  # value = column index
    ramp = torch.cat([torch.zeros(3, 1), grid.reshape(-1, 1)], dim=0)
    out = interpolate_vision_pos(ramp, 28 * 28)[3:].reshape(28, 28)
    steps = out[10, 4:24].diff()
    assert (steps > 0).all() and abs(steps.mean().item() - 0.5) < 0.02
    assert torch.allclose(out[3], out[20])  # rows unchanged across the other axis

    cfg224 = get_config("tiny", vocab_size=1000)
    cfg64 = get_config("tiny", vocab_size=1000, img_size=64)
    sd = official_state(build_official(cfg224))
    model = BEiT3(cfg64)
    model.load_state_dict(backbone_state(official_to_ours(sd, cfg64)))
    assert model(images=torch.randn(1, 3, 64, 64)).hidden.shape == (1, 65, cfg64.embed_dim)


def test_paper_layout_has_no_official_counterpart():
    cfg = get_config("tiny", layout="paper", vocab_size=1000)
    with pytest.raises(ConfigError, match="layout"):
        ours_to_official({}, cfg)


def test_mismatched_depth_is_reported():
    small = get_config("tiny", vocab_size=1000)
    deeper = small.replace(depth=3)
    with pytest.raises(KeyError):
        official_to_ours(official_state(build_official(deeper)), small)
