"""Data pipeline units: config validation, batch arithmetic, masking, crops, tokenizer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from beit3.data_pipeline import (BatchArithmeticError, BlockMaskGenerator, CropParams, DataConfig, DataConfigError,
                                 TextTokenizer, apply_crop, block_mask_reference, check_batch_arithmetic, mask_text,
                                 sample_crop)
from beit3.demo.digits import digits_images, write_corpus
from beit3.data_pipeline.augment import draw_jitter, jitter_


# ---- config -------------------------------------------------------------------------------
def test_config_from_dict_builds_nested_and_rejects_unknown_keys():
    cfg = DataConfig.from_dict({"images": 1024, "image_mask": {"num_patches": 75},
                                "augment": {"crop_scale": [0.2, 1.0]}, "image_shards": "/x/{0..3}.tar"})
    assert cfg.images == 1024 and cfg.image_mask.target(196) == 75 and cfg.augment.crop_scale == (0.2, 1.0)
    assert cfg.image_shards == ["/x/{0..3}.tar"]
    assert DataConfig().image_mask.target(196) == 78  # round(0.4 * 196)
    with pytest.raises(DataConfigError, match=r"data\.image_mask\.min_block"):
        DataConfig.from_dict({"image_mask": {"min_block": 4}})
    with pytest.raises(DataConfigError, match=r"data\.imgs"):
        DataConfig.from_dict({"imgs": 4})
    with pytest.raises(DataConfigError, match=r"data\.img_size"):
        DataConfig(img_size=225)
    with pytest.raises(DataConfigError, match=r"data\.text_mask\.pair_ratio"):
        DataConfig.from_dict({"text_mask": {"pair_ratio": 1.5}})
    with pytest.raises(DataConfigError, match=r"data\.image_shards"):
        DataConfig().require_inputs()


def test_batch_arithmetic_divides_or_names_the_numbers_to_change():
    cfg = DataConfig()
    assert check_batch_arithmetic(cfg, 8, 2) == {"image": 128, "text": 128, "pair": 128}
    assert check_batch_arithmetic(DataConfig(texts=0), 4, 1)["text"] == 0
    with pytest.raises(BatchArithmeticError) as e:
        check_batch_arithmetic(DataConfig(images=2048, texts=2048, pairs=1000), 3, 1)
    msg = str(e.value)
    assert "data.images=2048 (set it to 2046 or 2049)" in msg and "data.pairs=1000 (set it to 999 or 1002)" in msg
    assert "3*1 = 3" in msg
    with pytest.raises(BatchArithmeticError, match=r"grad_accum in \[1, 2, 3, 6\] at world_size=8"):
        check_batch_arithmetic(DataConfig(images=96, texts=96, pairs=48), 8, 5)
    with pytest.raises(BatchArithmeticError, match=r"no grad_accum works at world_size=8"):
        check_batch_arithmetic(DataConfig(images=96, texts=96, pairs=100), 8, 1)
    assert isinstance(BatchArithmeticError("x"), ValueError)


# ---- image masking ------------------------------------------------------------------------
@pytest.mark.parametrize("grid,target,min_block", [(14, 78, 16), (14, 75, 16), (4, 6, 2), (24, 230, 16)])
def test_block_mask_exact_count_and_matches_reference_loop(grid, target, min_block):
    gen = BlockMaskGenerator(grid, target, min_block)
    batch = gen.batch([np.random.default_rng(seed) for seed in range(120)])
    assert batch.shape == (120, grid * grid) and batch.dtype == bool
    assert (batch.sum(1) == target).all()
    for seed in range(120):
        fast = gen(np.random.default_rng(seed))
        ref = block_mask_reference(grid, target, np.random.default_rng(seed), min_block)
        assert fast.shape == (grid * grid,) and fast.dtype == bool
        assert int(fast.sum()) == target
        np.testing.assert_array_equal(fast, ref)
        np.testing.assert_array_equal(batch[seed], ref)
    assert gen.batch([]).shape == (0, grid * grid)


def test_block_mask_is_blockwise_not_scattered():
    """Masked cells form few large rectangles-unions: few connected components, mostly large."""
    gen = BlockMaskGenerator(14, 78, 16)
    comps = []
    for seed in range(100):
        m = gen(np.random.default_rng(seed)).reshape(14, 14)
        seen = np.zeros_like(m)
        sizes = []
        for i, j in zip(*np.nonzero(m)):
            if seen[i, j]:
                continue
            stack, n = [(i, j)], 0
            seen[i, j] = True
            while stack:
                a, b = stack.pop()
                n += 1
                for da, db in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    x, y = a + da, b + db
                    if 0 <= x < 14 and 0 <= y < 14 and m[x, y] and not seen[x, y]:
                        seen[x, y] = True
                        stack.append((x, y))
            sizes.append(n)
        comps.append(sizes)
    # the largest component holds at least one 16-patch block every time
    assert all(max(s) >= 16 for s in comps)
    # on average more than 85% of masked cells are in components of >= 9 cells (random scatter: ~0%)
    big = np.mean([sum(x for x in s if x >= 9) / 78 for s in comps])
    assert big > 0.85
    # different seeds give different masks, and the positions are spread over the grid
    masks = np.stack([gen(np.random.default_rng(s)) for s in range(300)])
    assert len({m.tobytes() for m in masks}) == 300
    freq = masks.mean(0)
    assert freq.min() > 0.02 and freq.max() < 0.85  # BEiT placement favours the centre; corners stay reachable
    assert abs(freq.mean() - 78 / 196) < 1e-9


# ---- text masking -------------------------------------------------------------------------
def test_mask_text_counts_specials_and_replacement():
    special = np.array([0, 1, 2, 3, 500])
    ids = np.array([0] + list(range(4, 104)) + [3, 3] + [2])  # <s> 100 tokens, two <unk>, </s>
    rng = np.random.default_rng(0)
    for ratio, expect in ((0.15, 15), (0.5, 50)):
        inp, chosen = mask_text(ids, ratio, rng, special, mask_id=500)
        assert chosen.sum() == expect
        assert not chosen[np.isin(ids, special)].any()
        assert (inp[chosen] == 500).all() and (inp[~chosen] == ids[~chosen]).all()
    # 80/10/10 scheme: the three outcomes appear in about those proportions
    outcomes = np.zeros(3)
    for s in range(200):
        inp, chosen = mask_text(ids, 0.5, np.random.default_rng(s), special, 500, replace_mask=0.8,
                                replace_random=0.1)
        v = inp[chosen]
        outcomes += [(v == 500).sum(), ((v != 500) & (v != ids[chosen])).sum(), (v == ids[chosen]).sum()]
        assert ((v >= 4) & (v <= 500)).all()
    frac = outcomes / outcomes.sum()
    assert abs(frac[0] - 0.8) < 0.02 and abs(frac[1] - 0.1) < 0.02  # random == original is rare (1/496)
    # nothing maskable: nothing masked
    inp, chosen = mask_text(np.array([0, 2]), 0.5, rng, special, 500)
    assert not chosen.any()


# ---- crops ------------------------------------------------------------------------------------
def test_crop_matches_torchvision_resized_crop_and_flip():
    img = digits_images(size=96, limit=1)[0][0]
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = sample_crop(img, rng)
        assert 0 <= p.i and p.i + p.h <= 96 and 0 <= p.j and p.j + p.w <= 96
        assert 0.08 * 96 * 96 * 0.9 <= p.h * p.w <= 96 * 96
        ours = apply_crop(img, p, 48)
        ref = TF.resized_crop(img, p.i, p.j, p.h, p.w, [48, 48], InterpolationMode.BICUBIC)
        if p.flip:
            ref = TF.hflip(ref)
        torch.testing.assert_close(ours, TF.to_tensor(ref), atol=1 / 255 + 1e-6, rtol=0)
    assert CropParams.from_dict(p.to_dict()) == p
    # a very elongated image exercises the center-crop fallback of torchvision's algorithm
    p = sample_crop((1000, 10), np.random.default_rng(0), scale=(0.9, 1.0))
    assert p.h == 10 and p.w == int(round(10 * 4 / 3)) and p.j == (1000 - p.w) // 2
    # flips happen about half the time; the crop statistics follow the configured ranges
    ps = [sample_crop((200, 200), np.random.default_rng(s)) for s in range(400)]
    assert 0.4 < np.mean([p.flip for p in ps]) < 0.6
    ratios = np.array([p.w / p.h for p in ps])
    assert ratios.min() > 0.7 and ratios.max() < 1.42


def test_color_jitter_draws_are_deterministic_and_bounded():
    f1, o1 = draw_jitter(0.4, np.random.default_rng(1))
    f2, o2 = draw_jitter(0.4, np.random.default_rng(1))
    f3, _ = draw_jitter(0.4, np.random.default_rng(2))
    assert (f1 == f2).all() and (o1 == o2).all() and not (f1 == f3).all()
    assert ((0.6 <= f1) & (f1 <= 1.4)).all() and sorted(o1.tolist()) == [0, 1, 2]
    rng = np.random.default_rng(1)
    f0, o0 = draw_jitter(0.0, rng)
    assert (f0 == 1).all() and o0.tolist() == [0, 1, 2] and rng.random() == np.random.default_rng(1).random()


# ---- tokenizer ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("spm")
    corpus = write_corpus(root / "corpus.txt", max_docs=60)
    return TextTokenizer.train([str(corpus)], root / "tok", vocab_size=300), corpus


def test_tokenizer_xlmr_ids_roundtrip(spm_model):
    tok, corpus = spm_model
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.num_pieces == 300 and tok.mask_id == 301 and tok.vocab_size == 302 and len(tok) == 302
    assert tok.vocab_size <= 64010
    text = "Return the number of items in a sequence."
    ids = tok.encode(text)
    assert ids and min(ids) >= 3 and max(ids) < tok.mask_id
    assert tok.decode(ids) == text
    assert tok.decode([0] + ids + [2, 1, 1, tok.mask_id]) == text
    assert tok.encode_with_specials(text, 6) == [0] + ids[:4] + [2]
    # spm piece p maps to p + 1 (fairseq offset), <unk> to 3
    assert tok.encode("\u4e2d\u6587")[-1] == 3 or 3 in tok.encode("\u4e2d\u6587")
    assert tok.sp.piece_to_id(tok.sp.id_to_piece(10)) + 1 == tok._to_model[10]
    import pickle
    tok2 = pickle.loads(pickle.dumps(tok))
    assert tok2.encode(text) == ids


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextTokenizer(tmp_path / "missing.model")


def test_color_jitter_equals_torchvision_ops():
    """The batched jitter = torchvision's ColorJitter(0.4, 0.4, 0.4) tensor ops, per image, in its order."""
    imgs = torch.stack([TF.to_tensor(im.convert("RGB")) for im in digits_images(size=24, limit=6)[0]])
    draws = [draw_jitter(0.4, np.random.default_rng(seed)) for seed in range(6)]
    factors = torch.from_numpy(np.stack([f for f, _ in draws]))
    order = torch.from_numpy(np.stack([o for _, o in draws]))
    ours = jitter_(imgs.clone(), factors, order)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for b, (f, o) in enumerate(draws):
        ref = imgs[b]
        for k in o:
            ref = ops[k](ref, float(f[k]))
        torch.testing.assert_close(ours[b], ref, atol=1e-6, rtol=0)


def test_shard_writer_maxsize_and_training_text_sources(tmp_path):
    """Shard size limit by bytes; the spm trainer reads plain text, JSONL and webdataset tars."""
    import json

    import webdataset as wds

    from beit3.data_pipeline import ShardWriter
    from beit3.data_pipeline.tokenizer import iter_text_file

    with ShardWriter(tmp_path / "s", "x", "pair", maxcount=1000, maxsize=10_000) as w:
        for k in range(20):
            w.write({"__key__": f"{k:04d}", "bin": bytes(3000), "txt": f"caption number {k}"})
    man = json.loads((tmp_path / "s/manifest.json").read_text())
    assert len(man["shards"]) > 5 and man["total"] == 20
    from beit3.data_pipeline import TarIndex
    for s in man["shards"]:  # member payload per shard stays under maxsize (tar headers/padding on top)
        ix = TarIndex(tmp_path / "s" / s["path"])
        assert len(ix) == s["count"] and sum(sz for m in ix.members for _, _, sz in m) <= 10_000
    back = list(wds.WebDataset(str(tmp_path / "s/x-*.tar").replace("*", "{000000..%06d}" % (len(man["shards"]) - 1)),
                               shardshuffle=False, empty_check=False))
    assert [int(s["__key__"]) for s in back] == list(range(20))
    (tmp_path / "a.jsonl").write_text('{"text": "hello jsonl"}\n{"caption": "a caption"}\n{bad\n{"text": ""}\n')
    (tmp_path / "b.txt").write_text("line one\n\nline two\n")
    assert list(iter_text_file(tmp_path / "a.jsonl")) == ["hello jsonl", "a caption"]
    assert list(iter_text_file(tmp_path / "b.txt")) == ["line one", "line two"]
    tar_texts = list(iter_text_file(tmp_path / "s" / man["shards"][0]["path"]))
    assert tar_texts == [f"caption number {k}" for k in range(man["shards"][0]["count"])]
    corpus = write_corpus(tmp_path / "corpus.txt", max_docs=20)
    tok = TextTokenizer.train([str(corpus), str(tmp_path / "a.jsonl")] + [str(p) for p in (tmp_path / "s").glob("*.tar")],
                              tmp_path / "mixed", vocab_size=200)
    assert tok.num_pieces == 200 and tok.decode(tok.encode("caption number 7")) == "caption number 7"
