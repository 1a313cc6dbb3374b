"""Visual-token targets: online labels, offline precompute into shards, offline == online codes."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beit3.data_pipeline import DataConfig, ImageLoader, ShardWriter, TarIndex, apply_crop
from beit3.data_pipeline import write_images
from beit3.demo.digits import write_digits_image_folder
from beit3.data_pipeline.samples import decode_image
from beit3.data_pipeline.transforms import CropParams
from beit3.model.vqkd import VQKD, get_vqkd_config, save_tokenizer
from beit3.pretrain import targets as targets_cli
from beit3.pretrain.targets import VisualTokenTargets


pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer(seed: int = 0) -> VQKD:
    torch.manual_seed(seed)
    m = VQKD(get_vqkd_config("tiny"))
    with torch.no_grad():
        m.quantize.embedding.weight.copy_(F.normalize(torch.randn_like(m.quantize.codebook), dim=-1))
        m.quantize.embedding.initted.fill_(1.0)
    return m


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqkd_targets")
    write_digits_image_folder(root / "digits", size=40, limit=48)  # larger than the view: real crops
    write_images.main([str(root / "digits"), str(root / "shards"), "-q", "--maxcount", "30"])
    with ShardWriter(root / "extra", "bad", "image") as w:  # one corrupt image, one good
        w.write({"__key__": "bad0", "png": b"not a png", "cls": 1})
        good = io.BytesIO()
        decode_image(TarIndex(str(root / "shards" / "images-000000.tar"))[0]).save(good, format="PNG")
        w.write({"__key__": "good0", "png": good.getvalue(), "cls": 2})
    tok_path = root / "tokenizer.pt"
    save_tokenizer(_tokenizer(), str(tok_path))
    return root, tok_path


def test_online_labels_are_codes_at_masked_positions():
    tok = _tokenizer()
    targets = VisualTokenTargets(tok)
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    images = torch.rand(3, 3, 32, 32)
    mask = torch.rand(3, 16) < 0.4
    mask[0, :] = False  # a row without masked patches
    labels = targets(images, mask)
    codes = tok.codes(images)
    assert labels.dtype == torch.long and labels.shape == (int(mask.sum()),)
    assert torch.equal(labels, codes[mask])
    assert torch.equal(targets.labels_from_codes(codes.to(torch.int16), mask), labels)
    with pytest.raises(ValueError, match="patch grid"):
        targets(images, torch.ones(3, 196, dtype=torch.bool))


def _stored(paths) -> dict[str, tuple[np.ndarray, list[dict]]]:
    out = {}
    for p in paths:
        idx = TarIndex(str(p))
        for k in range(len(idx)):
            s = idx[k]
            if "codes.npy" in s:
                out[s["__key__"]] = (np.load(io.BytesIO(s["codes.npy"])), json.loads(s["crops.json"]), s)
            else:
                out[s["__key__"]] = (None, None, s)
    return out


def test_offline_codes_equal_online_codes(data, tmp_path, capsys):
    root, tok_path = data
    out = tmp_path / "coded"
    rc = targets_cli.main(["--tokenizer", str(tok_path), "--shards", str(root / "shards" / "manifest.json"),
                           str(root / "extra" / "bad-000000.tar"), "--out", str(out), "--views", "3",
                           "--crop-scale", "0.3", "1.0", "--batch-size", "16", "--seed", "7", "-q"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["samples"] == 50 and summary["coded"] == 49 and summary["corrupt_image"] == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [30, 18, 2] and manifest["meta"]["codes"]["views"] == 3
    assert manifest["meta"]["codes"]["dtype"] == "float32"  # the encoder dtype the codes were made in

    stored = _stored(out / s["path"] for s in manifest["shards"])
    assert stored["bad0"][0] is None and stored["bad0"][2]["png"] == b"not a png"  # copied, not lost
    targets = VisualTokenTargets.from_checkpoint(str(tok_path))
    for key in ("000000000", "000000017", "000000041", "good0"):
        codes, crops, sample = stored[key]
        assert codes.dtype == np.int16 and codes.shape == (3, 16) and len(crops) == 3
        assert sample["cls"] and ("json" in sample or key == "good0")  # original fields kept
        img = decode_image(sample)
        views = torch.stack([apply_crop(img, CropParams.from_dict(c), 32) for c in crops])
        online = targets.codes(views)  # fp32 on CPU
        assert torch.equal(online, torch.from_numpy(codes.astype(np.int64)))
    assert len({json.dumps(c) for c in stored["000000000"][1]}) == 3  # three distinct views

    # the loader reads the precomputed codes (one of the K views per sample) instead of pixels
    cfg = DataConfig(image_shards=[str(out / "manifest.json")], img_size=32, patch_size=8, num_workers=0,
                     offline_codes=True)
    batch = next(iter(ImageLoader(cfg, 0, 1, batch_size=8)))
    assert "tokenizer_images" not in batch and batch["codes"].shape == (8, 16)
    rows = {tuple(r) for c, _, _ in stored.values() if c is not None for r in c.tolist()}
    assert all(tuple(r) in rows for r in batch["codes"].tolist())


def test_fixed_view_and_online_loader_batch(data, tmp_path):
    """A fixed (whole-image) view's stored codes equal the online codes of that view; an online
    loader batch (tokenizer view + block mask) gives codes[mask]."""
    root, tok_path = data
    out = tmp_path / "fixed"
    targets_cli.main(["--tokenizer", str(tok_path), "--shards", str(root / "shards" / "manifest.json"),
                      "--out", str(out), "--fixed", "-q"])
    stored = _stored(sorted(out.glob("*.tar")))
    targets = VisualTokenTargets.from_checkpoint(str(tok_path))
    for key in ("000000003", "000000040"):
        codes, crops, sample = stored[key]
        img = decode_image(sample)
        assert crops == [{"i": 0, "j": 0, "h": img.height, "w": img.width, "flip": False}]
        full = apply_crop(img, CropParams.from_dict(crops[0]), 32)[None]
        assert torch.equal(targets.codes(full)[0], torch.from_numpy(codes[0].astype(np.int64)))

    cfg = DataConfig(image_shards=[str(root / "shards" / "manifest.json")], img_size=32, patch_size=8,
                     num_workers=0)
    batch = next(iter(ImageLoader(cfg, 0, 1, batch_size=4, with_mask=True)))
    labels = targets.for_batch(batch)
    assert torch.equal(labels, targets.codes(batch["tokenizer_images"])[batch["image_mask"]])
    assert labels.numel() == int(batch["image_mask"].sum()) == 4 * round(0.4 * 16)


def test_offline_codes_in_pair_shards(data, tmp_path, capsys):
    """Codes precomputed into PAIR shards: captions and images are kept, and the pretraining
    loader yields pair batches with ``codes`` (one of the stored views) instead of pixels."""
    from beit3.data_pipeline import PretrainLoader, TextTokenizer, write_pairs
    from beit3.demo.digits import write_digits_pairs_tsv

    root, tok_path = data
    tsv = write_digits_pairs_tsv(tmp_path / "src", size=40, limit=24)
    assert write_pairs.main([str(tsv), str(tmp_path / "pairs"), "-q"]) == 0
    spm = TextTokenizer.train([str(tsv)], tmp_path / "spm", vocab_size=60)
    assert targets_cli.main(["--tokenizer", str(tok_path), "--shards", str(tmp_path / "pairs" / "manifest.json"),
                             "--out", str(tmp_path / "coded"), "--source", "pair", "--views", "2", "-q"]) == 0
    capsys.readouterr()
    manifest = json.loads((tmp_path / "coded" / "manifest.json").read_text())
    assert manifest["source"] == "pair" and manifest["total"] == 24
    stored = _stored(tmp_path / "coded" / s["path"] for s in manifest["shards"])
    assert all(c is not None and c.shape == (2, 16) and s["txt"] for c, _, s in stored.values())
    cfg = DataConfig(pair_shards=[str(tmp_path / "coded" / "manifest.json")], images=0, texts=0, pairs=4,
                     img_size=32, patch_size=8, spm_path=spm.path, max_pair_text_len=16, num_workers=0,
                     offline_codes=True)
    batch = next(iter(PretrainLoader(cfg, 0, 1, 1)))["pair"]
    assert "tokenizer_images" not in batch and batch["codes"].shape == (4, 16)
    assert batch["text_ids"].shape == (4, 16) and batch["image_mask"].shape == (4, 16)
    rows = {tuple(r) for c, _, _ in stored.values() for r in c.tolist()}
    assert all(tuple(r) in rows for r in batch["codes"].tolist())
    targets = VisualTokenTargets.from_checkpoint(str(tok_path))
    assert targets.for_batch(batch).numel() == int(batch["image_mask"].sum())
    # a pretraining step on the offline batch needs no tokenizer at all
    from beit3.model import BEiT3ForPretraining, get_config
    from beit3.pretrain.objective import mdm_loss

    torch.manual_seed(0)
    model = BEiT3ForPretraining(get_config("tiny", vocab_size=spm.vocab_size, num_visual_tokens=128))
    result = mdm_loss(model, {"pair": batch}, None, torch.device("cpu"))
    assert torch.isfinite(result.loss) and result.parts["pair/mim"].count == int(batch["image_mask"].sum())
    result.loss.backward()
