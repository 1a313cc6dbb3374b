"""Data pipeline end to end on real shards (scikit-learn digits, standard-library docstrings):
writer round trips, exact mixing over ranks/workers, skip counting, resume, offline codes."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from beit3.data_pipeline import (AugmentConfig, DataConfig, DataConfigError, ImageLoader, ImageMaskConfig, PretrainLoader,
                                 TextTokenizer, apply_crop, sample_crop)
from beit3.data_pipeline import train_spm, write_images, write_manifest, write_pairs, write_texts
from beit3.demo.digits import caption, corpus_documents, digits_images, write_digits_image_folder, \
    write_digits_pairs_tsv
from beit3.data_pipeline.sequence import GlobalSampleSequence
from beit3.data_pipeline.shards import ShardWriter, TarIndex
from beit3.data_pipeline.augment import finish_views
from beit3.data_pipeline.config import SOURCES
from beit3.data_pipeline.transforms import normalize_


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    folder = write_digits_image_folder(root / "digits", size=32, limit=240)
    docs = corpus_documents(40)
    (root / "corpus.txt").write_text("\n\n".join(" ".join(d.split()) for d in docs) + "\n")
    with open(root / "extra.jsonl", "w") as f:
        for d in docs[:5]:
            f.write(json.dumps({"text": d}) + "\n")
        f.write(json.dumps({"text": ""}) + "\n")  # empty document: skipped
        f.write("{not json\n")  # bad record: skipped
    tsv = write_digits_pairs_tsv(root / "pairs_src", size=32, limit=160)
    assert train_spm.main([str(root / "corpus.txt"), str(tsv), "--out-prefix", str(root / "spm"),
                                 "--vocab-size", "400"]) == 0
    assert write_images.main([str(folder), str(root / "img"), "--maxcount", "50", "-q"]) == 0
    assert write_texts.main([str(root / "corpus.txt"), str(root / "extra.jsonl"), str(root / "txt"),
                             "--spm", str(root / "spm.model"), "--segment-len", "40", "--maxcount", "100", "-q"]) == 0
    assert write_pairs.main([str(tsv), str(root / "pair"), "--maxcount", "40", "-q"]) == 0
    # COCO-captions style JSON over the same images (two captions per image)
    images = [{"id": k, "file_name": f"{k:05d}.jpg"} for k in range(30)]
    anns = [{"id": 2 * k + c, "image_id": k, "caption": f"caption {c} of image {k}"} for k in range(30) for c in range(2)]
    anns.append({"id": 999, "image_id": 3, "caption": "   "})  # empty caption: skipped
    anns.append({"id": 998, "image_id": 12345, "caption": "no such image"})  # missing image: skipped
    (root / "coco.json").write_text(json.dumps({"images": images, "annotations": anns}))
    assert write_pairs.main([str(root / "coco.json"), str(root / "coco"), "--image-root", str(root / "pairs_src/images"),
                             "-q"]) == 0
    # img2dataset-style shards: NNNN.jpg + .txt + .json per sample, written as they come
    imgs, labels = digits_images(size=32, limit=60)
    for s in range(2):
        with wds.TarWriter(str(root / f"i2d-{s:05d}.tar")) as w:
            for k in range(30 * s, 30 * s + 30):
                buf = io.BytesIO()
                imgs[k].save(buf, format="JPEG")
                w.write({"__key__": f"{s:05d}{k:04d}", "jpg": buf.getvalue(), "txt": caption(int(labels[k]), k),
                         "json": {"key": f"{s:05d}{k:04d}", "status": "success"}})
    return root


def make_cfg(root: Path, **kw) -> DataConfig:
    base = dict(image_shards=[str(root / "img/manifest.json")], text_shards=[str(root / "txt/manifest.json")],
                pair_shards=[str(root / "pair/manifest.json")], images=8, texts=8, pairs=8, img_size=32, patch_size=8,
                image_mask=ImageMaskConfig(min_block_patches=2), max_text_len=24, max_pair_text_len=16,
                spm_path=str(root / "spm.model"), num_workers=0, shuffle_window_shards=2, seed=7)
    base.update(kw)
    return DataConfig(**base)


def read_all(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False, empty_check=False))


# ---- writers: round trips through plain webdataset -------------------------------------------
def test_write_images_round_trip(data):
    man = json.loads((data / "img/manifest.json").read_text())
    assert man["total"] == 240 and [s["count"] for s in man["shards"]] == [50, 50, 50, 50, 40]
    classes = man["meta"]["classes"]
    samples = read_all(str(data / "img/images-{000000..000004}.tar"))
    assert len(samples) == 240
    for s in samples[:40]:
        meta = json.loads(s["json"])
        src = data / "digits" / meta["path"]
        assert s["png"] == src.read_bytes()  # stored as is
        assert classes[int(s["cls"])] == meta["class"] == src.parent.name
    assert len({int(s["cls"]) for s in samples}) == 10


def test_write_texts_round_trip(data):
    tok = TextTokenizer(data / "spm.model")
    man = json.loads((data / "txt/manifest.json").read_text())
    assert man["meta"]["vocab_size"] == tok.vocab_size
    samples = read_all(str(data / "txt/texts-*.tar".replace("*", "{000000..%06d}" % (len(man["shards"]) - 1))))
    assert len(samples) == man["total"]
    docs = [" ".join(d.split()) for d in corpus_documents(40)]
    by_doc: dict[tuple[int, int], list] = {}
    for s in samples:
        meta = json.loads(s["json"])
        tokens = np.load(io.BytesIO(s["tokens.npy"]))
        assert tokens.dtype == np.int32 and 1 <= len(tokens) <= 40
        by_doc.setdefault((meta["src"], meta["doc"]), []).append((meta["seg"], tokens))
    for (src, d), segs in list(by_doc.items())[:10]:
        if src != 0:
            continue
        ids = np.concatenate([t for _, t in sorted(segs, key=lambda x: x[0])])
        full = tok.encode(docs[d])
        assert ids.tolist() == full[:len(ids)] and len(full) - len(ids) < 8  # only a short tail dropped
    assert {k[0] for k in by_doc} == {0, 1} and len([k for k in by_doc if k[0] == 1]) == 5


def test_write_pairs_round_trip_tsv_and_coco(data):
    samples = read_all(str(data / "pair/pairs-{000000..000003}.tar"))
    assert len(samples) == 160
    labels = digits_images(8, 160)[1]
    for s in samples[:20]:
        meta = json.loads(s["json"])
        assert s["jpg"] == Path(meta["path"]).read_bytes()
        k = int(Path(meta["path"]).stem)
        assert s["txt"].decode() == caption(int(labels[k]), k)
    coco = read_all(str(data / "coco/pairs-000000.tar"))
    assert len(coco) == 60 and json.loads((data / "coco/manifest.json").read_text())["total"] == 60
    assert {s["txt"].decode() for s in coco} == {f"caption {c} of image {k}" for k in range(30) for c in range(2)}


def test_write_manifest_for_img2dataset_shards_and_missing_patterns(data, tmp_path):
    assert write_manifest.main([str(data / "i2d-*.tar"), "--source", "pair", "--out", str(data / "i2d.json")]) == 0
    man = json.loads((data / "i2d.json").read_text())
    assert [s["count"] for s in man["shards"]] == [30, 30]
    with pytest.raises(DataConfigError, match=r"data\.image_shards: pattern .*nothing-\*\.tar' matches no shard"):
        PretrainLoader(make_cfg(data, image_shards=[str(tmp_path / "nothing-*.tar")]), 0, 1, 1)
    with pytest.raises(DataConfigError, match=r"data\.pair_shards: manifest .* does not exist"):
        PretrainLoader(make_cfg(data, pair_shards=[str(tmp_path / "m.json")]), 0, 1, 1)
    with pytest.raises(FileNotFoundError, match="SentencePiece model"):
        PretrainLoader(make_cfg(data, spm_path=str(tmp_path / "x.model")), 0, 1, 1)
    other = TextTokenizer.train([str(data / "corpus.txt")], tmp_path / "other", vocab_size=300)
    with pytest.raises(DataConfigError, match=r"data\.text_shards: .* was tokenized with"):
        PretrainLoader(make_cfg(data, spm_path=other.path), 0, 1, 1)
    with pytest.raises(SystemExit, match="no class sub-folders"):
        write_images.main([str(tmp_path), str(tmp_path / "out")])


# ---- the global sequence ------------------------------------------------------------------
def test_sequence_is_a_permutation_per_epoch():
    counts = [7, 0, 13, 5, 20, 1]
    seq = GlobalSampleSequence(counts, seed=3, source="image", window=2)
    for epoch in range(3):
        ids = [seq.locate(epoch * 46 + r)[2] for r in range(46)]
        assert sorted(ids) == list(range(46))
    first = [seq.locate(r)[2] for r in range(46)]
    assert first != [seq.locate(46 + r)[2] for r in range(46)] and first != list(range(46))
    # locality: consecutive positions stay within a window of 2 shards
    shards = [seq.locate(r)[0] for r in range(46)]
    assert len({frozenset(shards[i:i + 5]) for i in range(0, 10)}) >= 1 and len(set(shards[:5])) <= 2
    again = GlobalSampleSequence(counts, seed=3, source="image", window=2)
    assert [again.locate(r) for r in range(100, 0, -7)] == [seq.locate(r) for r in range(100, 0, -7)]


# ---- loader: exact ratio and world-size independence -----------------------------------------
def _run(cfg, rank, world, accum, n, state=None):
    loader = PretrainLoader(cfg, rank, world, accum)
    if state is not None:
        loader.load_state_dict(state)
    out = []
    for batch in loader:  # the training step finishes the views (augment_on: device)
        out.append({k: finish_views(dict(v)) if isinstance(v, dict) and k in SOURCES else v for k, v in batch.items()})
        if len(out) == n:
            break
    return out, loader.state_dict()


def _step_ids(batches, src):
    steps: dict[int, list[int]] = {}
    for b in batches:
        steps.setdefault(b["step"], []).extend(b[src]["sample_ids"].tolist())
    return {s: sorted(v) for s, v in steps.items()}


def test_exact_ratio_world_size_2_with_2_workers(data):
    """Pairs come from ONE shard (the COCO one): fewer shards than ranks x workers."""
    steps, accum = 12, 2
    one_shard = [str(data / "coco/manifest.json")]
    cfg = make_cfg(data, images=8, texts=12, pairs=4, num_workers=2, pair_shards=one_shard)
    per_rank = [_run(cfg, r, 2, accum, steps * accum)[0] for r in range(2)]
    single, _ = _run(make_cfg(data, images=8, texts=12, pairs=4, pair_shards=one_shard), 0, 1, 1, steps)
    for rank_batches in per_rank:
        for b in rank_batches:
            # every micro-batch of every rank holds all three modalities in the exact per-rank size
            assert b["image"]["images"].shape == (2, 3, 32, 32) and b["image"]["image_mask"].shape == (2, 16)
            assert b["image"]["tokenizer_images"].shape == (2, 3, 32, 32)
            assert b["text"]["text_ids"].shape == (3, 24) and b["pair"]["text_ids"].shape == (1, 16)
            assert b["pair"]["images"].shape == (1, 3, 32, 32) and b["pair"]["image_mask"].shape == (1, 16)
            assert b["image"]["image_mask"].sum(1).tolist() == [6, 6]  # round(0.4 * 16)
    for src, count in (("image", 8), ("text", 12), ("pair", 4)):
        merged = {s: sorted(_step_ids(per_rank[0], src)[s] + _step_ids(per_rank[1], src)[s]) for s in range(steps)}
        ref = _step_ids(single, src)
        assert all(len(merged[s]) == count for s in range(steps))
        assert merged == ref  # the samples of a step do not depend on world size / accumulation / workers
    # and the tensors of a given position are identical whatever the split
    r0 = per_rank[0][0]["image"]
    torch.testing.assert_close(r0["images"], single[0]["image"]["images"][:2])
    torch.testing.assert_close(r0["image_mask"], single[0]["image"]["image_mask"][:2])
    torch.testing.assert_close(per_rank[0][0]["text"]["text_ids"], single[0]["text"]["text_ids"][:3])


def test_batch_contents(data):
    cfg = make_cfg(data)
    (b,), _ = _run(cfg, 0, 1, 1, 1)
    im = b["image"]
    assert im["images"].dtype == torch.float32 and -1.0 <= im["images"].min() and im["images"].max() <= 1.0
    assert 0.0 <= im["tokenizer_images"].min() and im["tokenizer_images"].max() <= 1.0
    assert im["image_mask"].dtype == torch.bool
    tok = TextTokenizer(data / "spm.model")
    for src, ratio in (("text", 0.15), ("pair", 0.5)):
        t = b[src]
        ids, labels, tm, pad = t["text_ids"], t["text_labels"], t["text_mask"], t["padding_mask"]
        assert ids.dtype == labels.dtype == torch.long and tm.dtype == pad.dtype == torch.bool
        for row in range(ids.shape[0]):
            n = int((~pad[row]).sum())
            assert labels[row, 0] == 0 and labels[row, n - 1] == 2 and (labels[row, n:] == 1).all()
            assert not tm[row, [0, n - 1]].any() and not (tm[row] & pad[row]).any()
            body = labels[row, 1:n - 1]
            maskable = int((body != 3).sum())
            assert int(tm[row].sum()) == max(1, round(ratio * maskable))
            assert (ids[row][tm[row]] == tok.mask_id).all() and (ids[row][~tm[row]] == labels[row][~tm[row]]).all()
    caption_text = tok.decode(b["pair"]["text_labels"][0].tolist())
    assert "digit" in caption_text or "number" in caption_text or "picture" in caption_text or "pen" in caption_text


# ---- bad input --------------------------------------------------------------------------------
def test_corrupt_empty_missing_and_unreadable_are_skipped_and_counted(data, tmp_path):
    good = read_all(str(data / "pair/pairs-000000.tar"))[:12]
    with ShardWriter(tmp_path / "bad", "pairs", "pair", maxcount=100) as w:
        for k, s in enumerate(good):
            sample = {"__key__": f"{k:05d}", "jpg": s["jpg"], "txt": s["txt"]}
            if k == 1:
                sample["jpg"] = s["jpg"][: len(s["jpg"]) // 3]  # truncated JPEG
            if k == 2:
                sample["jpg"] = b"not an image at all"
            if k == 3:
                sample["txt"] = "   "
            if k == 4:
                sample["txt"] = b"\xff\xfe\xfa caption"
            if k == 5:
                del sample["jpg"]
            w.write(sample)
    man = json.loads((tmp_path / "bad/manifest.json").read_text())
    (tmp_path / "bad/broken.tar").write_bytes(b"\x00garbage" * 100)  # unreadable shard, listed with 5 samples
    man["shards"].append({"path": "broken.tar", "count": 5})
    (tmp_path / "bad/manifest.json").write_text(json.dumps(man))
    cfg = make_cfg(data, pair_shards=[str(tmp_path / "bad/manifest.json")], images=4, texts=4, pairs=4,
                   shuffle_window_shards=4)
    batches, state = _run(cfg, 0, 1, 1, 17)  # 68 pair positions = 4 epochs of 17 samples
    for b in batches:
        assert b["pair"]["images"].shape[0] == 4 and b["pair"]["text_ids"].shape[0] == 4
        bad_ids = set(b["pair"]["sample_ids"].tolist()) & {1, 2, 3, 4, 5, 12, 13, 14, 15, 16}
        assert not bad_ids
    stats = batches[-1]["stats"]
    assert stats["pair/corrupt_image"] >= 8 and stats["pair/empty_text"] >= 4
    assert stats["pair/undecodable_text"] >= 4 and stats["pair/missing_field"] >= 4
    assert stats["pair/shard_unreadable"] >= 20
    assert state["stats"] == stats


# ---- resume ---------------------------------------------------------------------------------
def test_resume_continues_exact_sequence_same_and_different_world_size(data):
    cfg = make_cfg(data, num_workers=2, prefetch_factor=4)
    full, _ = _run(make_cfg(data), 0, 1, 1, 6)  # reference: steps 0..5 on one rank
    # rank 0 of 2 (grad_accum 2) consumes 2 steps while its workers prefetch further; checkpoint
    first, state = _run(cfg, 0, 2, 2, 4)
    assert state["step"] == 2 and state["micro_step"] == 0
    state = json.loads(json.dumps(state))  # it travels in a checkpoint
    # same world size: identical continuation (ids and tensors)
    cont, _ = _run(cfg, 0, 2, 2, 4, state)
    uninterrupted, _ = _run(cfg, 0, 2, 2, 8)
    for a, b in zip(cont, uninterrupted[4:]):
        for src in ("image", "text", "pair"):
            for k in a[src]:
                torch.testing.assert_close(a[src][k], b[src][k])
    # different world size (1 rank, no accumulation): steps 2.. equal the reference's steps 2..
    other, _ = _run(make_cfg(data), 0, 1, 1, 4, state)
    assert [b["step"] for b in other] == [2, 3, 4, 5]
    for src in ("image", "text", "pair"):
        assert _step_ids(other, src) == {s: v for s, v in _step_ids(full, src).items() if s >= 2}
        torch.testing.assert_close(other[0][src]["images" if src != "text" else "text_ids"],
                                   full[2][src]["images" if src != "text" else "text_ids"])
    # world size 4, mid-step resume at a compatible micro-step boundary
    mid, st = _run(make_cfg(data), 0, 2, 2, 3)  # step 1, micro 1 of 2
    assert (st["step"], st["micro_step"]) == (1, 1)
    four, _ = _run(make_cfg(data), 3, 4, 2, 1, st)  # grad_accum 2 -> same fraction
    assert (four[0]["step"], four[0]["micro_step"]) == (1, 1)
    ref_ids = sorted(_step_ids(full, "image")[1])
    assert set(four[0]["image"]["sample_ids"].tolist()) <= set(ref_ids)
    with pytest.raises(ValueError, match="not a micro-step boundary"):
        PretrainLoader(make_cfg(data), 0, 1, 1).load_state_dict(st)
    with pytest.raises(ValueError, match="global counts"):
        PretrainLoader(make_cfg(data, images=16), 0, 1, 1).load_state_dict(state)


def test_a_rollback_re_points_the_same_worker_processes(data):
    """Workers are forked once: going back to step 1 (a rollback) or on (a seek) re-points them,
    no process is forked from the by-then multi-threaded trainer, and the stream equals that of
    an uninterrupted loader; ``close()`` ends them."""
    import multiprocessing as mp

    before = {p.pid for p in mp.active_children()}
    loader = PretrainLoader(make_cfg(data, num_workers=2, prefetch_factor=2), 0, 1, 1)
    it = iter(loader)
    ahead = [next(it) for _ in range(5)]
    workers = {p.pid for p in mp.active_children()} - before
    assert len(workers) == 2
    for target in (1, 4):  # back (a rollback), then forward past a skip window (a seek)
        it.close()
        state = loader.state_dict()
        state.update(step=target, micro_step=0)
        loader.load_state_dict(state)
        it = iter(loader)
        got = [next(it) for _ in range(1 if target == 4 else 3)]
        assert {p.pid for p in mp.active_children()} - before == workers
        assert [b["step"] for b in got] == list(range(target, target + len(got)))
        for a, b in zip(got, ahead[target:]):
            for src in ("image", "text", "pair"):
                for k in a[src]:
                    torch.testing.assert_close(a[src][k], b[src][k])
    it.close()
    loader.close()
    assert not ({p.pid for p in mp.active_children()} & workers)


# ---- offline codes and the image-only loader --------------------------------------------------
def test_offline_codes_use_the_stored_view(data, tmp_path):
    from PIL import Image
    src = read_all(str(data / "img/images-000000.tar"))[:10]
    expected = {}
    with ShardWriter(tmp_path / "codes", "images", "image") as w:
        for k, s in enumerate(src):
            sample = {"__key__": f"{k:05d}", "png": s["png"], "cls": s["cls"]}
            if k != 3:  # sample 3 has no codes: skipped and counted
                img = Image.open(io.BytesIO(s["png"])).convert("RGB")
                rng = np.random.default_rng(k)
                crops = [sample_crop(img, rng) for _ in range(2)]
                codes = np.stack([np.full(16, 100 * k + v, dtype=np.int16) for v in range(2)])
                sample.update({"codes.npy": codes, "crops.json": json.dumps([c.to_dict() for c in crops])})
                expected[k] = [(int(codes[v, 0]), normalize_(apply_crop(img, crops[v], 32))) for v in range(2)]
            w.write(sample)
    cfg = make_cfg(data, image_shards=[str(tmp_path / "codes/manifest.json")], texts=0, pairs=0, images=4,
                   offline_codes=True, augment=AugmentConfig(color_jitter=0.0))
    loader = ImageLoader(cfg, 0, 1, batch_size=4)
    batches = [b for _, b in zip(range(5), loader)]
    for b in batches:
        assert "codes" in b and "tokenizer_images" not in b and b["codes"].shape == (4, 16)
        assert b["codes"].dtype == torch.long
        for sid, codes, image in zip(b["sample_ids"].tolist(), b["codes"], b["images"]):
            assert sid != 3
            views = [img for c0, img in expected[sid] if c0 == int(codes[0])]
            assert len(views) == 1 and (codes == codes[0]).all()
            torch.testing.assert_close(image, views[0])
    assert batches[-1]["stats"]["image/missing_codes"] >= 1


def test_image_loader_labels_and_img2dataset_pairs(data, tmp_path):
    cfg = make_cfg(data, texts=0, pairs=0)
    loader = ImageLoader(cfg, 1, 2, batch_size=6)
    b = next(iter(loader))
    assert b["images"].shape == (6, 3, 32, 32) and b["tokenizer_images"].shape == (6, 3, 32, 32)
    assert "image_mask" not in b
    index = [ix[i] for ix in map(TarIndex, sorted((data / "img").glob("*.tar"))) for i in range(len(ix))]
    for sid, label in zip(b["sample_ids"].tolist(), b["labels"].tolist()):
        assert int(index[sid]["cls"]) == label
    # img2dataset shards are consumed as they are, through a glob or the manifest
    assert write_manifest.main([str(data / "i2d-*.tar"), "--source", "pair", "--out", str(tmp_path / "m.json")]) == 0
    for spec in (str(data / "i2d-*.tar"), str(tmp_path / "m.json")):
        (b,), _ = _run(make_cfg(data, pair_shards=[spec]), 0, 1, 1, 1)
        assert b["pair"]["images"].shape == (8, 3, 32, 32) and not b["stats"]


def test_tar_header_scan_matches_tarfile_and_survives_truncation(tmp_path):
    from beit3.data_pipeline.shards import scan_tar
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        p = tmp_path / f"t{fmt}.tar"
        with tarfile.open(p, "w", format=fmt) as tf:
            members = [("d/" * 20 + "x" * 20 + ".jpg", b"1" * 700), ("k1.txt", "\u00e9t\u00e9".encode()), ("k1.json", b"")]
            if fmt != tarfile.USTAR_FORMAT:
                members.append(("a/" + "y" * 150 + ".txt", b"long name"))
            for name, payload in members:
                ti = tarfile.TarInfo(name)
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
        ref = [(m.name, m.offset_data, m.size) for m in tarfile.open(p) if m.isfile()]
        assert scan_tar(str(p)) == ref
    whole = (tmp_path / f"t{tarfile.PAX_FORMAT}.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(whole[:1800])
    ix = TarIndex(tmp_path / "cut.tar")
    assert ix.truncated and len(ix) == 1 and ix[0]["jpg"] == b"1" * 700
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    with pytest.raises(tarfile.ReadError):
        TarIndex(tmp_path / "junk.tar")
