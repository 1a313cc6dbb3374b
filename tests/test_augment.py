"""uint8 crops + augmentation in the training step (``data.augment_on``) and the reduced-DCT decode."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from beit3.data_pipeline import DataConfig, ImageMaskConfig, PretrainLoader, ShardWriter, sample_crop
from beit3.data_pipeline.augment import finish_views, h2d_bytes_per_image
from beit3.demo.digits import caption, digits_images, photo_jpegs
from beit3.data_pipeline.transforms import CropParams, crop_resize, draft_scale, open_reduced, to_uint8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Image and pair shards of photographs (JPEG, 256..1024 px) and digits (PNG)."""
    root = tmp_path_factory.mktemp("aug")
    jpegs = photo_jpegs(24, sizes=(256, 512, 1024))
    digits, labels = digits_images(size=40, limit=24)
    with ShardWriter(root / "img", "images", "image", maxcount=12) as w:
        for k in range(24):
            buf = io.BytesIO()
            digits[k].save(buf, format="PNG")
            w.write({"__key__": f"{k:05d}", "jpg" if k % 2 else "png": jpegs[k] if k % 2 else buf.getvalue()})
    with ShardWriter(root / "pair", "pairs", "pair", maxcount=12) as w:
        for k in range(24):
            w.write({"__key__": f"{k:05d}", "jpg": jpegs[k], "txt": caption(int(labels[k]), k)})
    from beit3.demo.digits import write_corpus
    from beit3.data_pipeline.tokenizer import TextTokenizer
    TextTokenizer.train([str(write_corpus(root / "c.txt", 20))], root / "spm", vocab_size=200)
    return root


def _cfg(root, **kw) -> DataConfig:
    base = dict(image_shards=[str(root / "img/manifest.json")], pair_shards=[str(root / "pair/manifest.json")],
                images=4, texts=0, pairs=4, img_size=32, patch_size=8, image_mask=ImageMaskConfig(min_block_patches=2),
                max_pair_text_len=16, spm_path=str(root / "spm.model"), num_workers=0, seed=3)
    base.update(kw)
    return DataConfig(**base)


def _batches(cfg: DataConfig, n: int) -> list[dict]:
    loader = PretrainLoader(cfg, 0, 1, 1)
    return [b for _, b in zip(range(n), loader)]


@pytest.mark.parametrize("tok_size", [None, 16])
def test_device_and_cpu_augmentation_give_the_same_tensors(shards, tok_size):
    cpu = _batches(_cfg(shards, augment_on="cpu", tokenizer_img_size=tok_size), 3)
    dev = _batches(_cfg(shards, augment_on="device", tokenizer_img_size=tok_size), 3)
    for a, b in zip(cpu, dev):
        for src in ("image", "pair"):
            assert b[src]["crops"].dtype == torch.uint8 and "images" not in b[src]
            assert ("tok_crops" in b[src]) == (tok_size is not None)
            done = finish_views(dict(b[src]))
            assert set(done) == set(a[src])
            for k in a[src]:
                torch.testing.assert_close(done[k], a[src][k], atol=1e-6, rtol=0)
            assert done["images"].shape == (4, 3, 32, 32)
            assert done["tokenizer_images"].shape == (4, 3, tok_size or 32, tok_size or 32)
    # the augmentation really varies: flips, factors and orders differ between samples
    flips = torch.cat([b["image"]["flip"] for b in dev])
    assert 0 < int(flips.sum()) < len(flips) and len({tuple(o.tolist()) for b in dev for o in b["pair"]["jitter_order"]}) > 1


def test_host_to_device_bytes_per_image_are_the_uint8_crop(shards):
    """Deterministic counts: two float32 views + mask vs one uint8 crop + 16 bytes of parameters + mask."""
    cfg = dict(img_size=224, patch_size=16, image_mask=ImageMaskConfig())
    (cpu,) = _batches(_cfg(shards, augment_on="cpu", **cfg), 1)
    (dev,) = _batches(_cfg(shards, augment_on="device", **cfg), 1)
    view, mask = 3 * 224 * 224, 196
    assert h2d_bytes_per_image(cpu["image"]) == 2 * 4 * view + mask
    assert h2d_bytes_per_image(dev["image"]) == view + 1 + 12 + 3 + mask  # crop, flip, 3 factors, 3 op indices
    assert h2d_bytes_per_image(dev["image"]) <= h2d_bytes_per_image(cpu["image"]) / 7.9


def test_finish_views_in_the_objective_matches_the_cpu_path(shards):
    """``mdm_loss`` moves the uint8 batch and renders the views on the device, in the model's dtype."""
    from beit3.pretrain.objective import to_device
    (cpu,) = _batches(_cfg(shards, augment_on="cpu"), 1)
    (dev,) = _batches(_cfg(shards, augment_on="device"), 1)
    got = finish_views(to_device(dev["pair"], torch.device("cpu"), torch.bfloat16), torch.bfloat16)
    assert got["images"].dtype == torch.bfloat16 and got["tokenizer_images"].dtype == torch.float32
    torch.testing.assert_close(got["images"].float(), cpu["pair"]["images"], atol=1e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_augmentation_equals_the_cpu_path(shards):
    (cpu,) = _batches(_cfg(shards, augment_on="cpu", tokenizer_img_size=16), 1)
    (dev,) = _batches(_cfg(shards, augment_on="device", tokenizer_img_size=16), 1)
    for src in ("image", "pair"):
        on_gpu = finish_views({k: v.cuda() for k, v in dev[src].items()})
        for k, v in cpu[src].items():
            torch.testing.assert_close(on_gpu[k].cpu(), v, atol=1e-5, rtol=0)


# ---- reduced-DCT decode ----------------------------------------------------------------------
def _jpeg_with_disc(width: int, height: int, cx: float, cy: float, r: float) -> bytes:
    """A photograph-like background with one bright disc of radius ``r`` centred at (cx, cy)."""
    bg = Image.open(io.BytesIO(photo_jpegs(1, sizes=(max(width, height),))[0])).convert("RGB").resize((width, height))
    arr = np.asarray(bg, dtype=np.float32) * 0.4
    yy, xx = np.mgrid[:height, :width]
    arr[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r] = 255.0
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _centroid(crop: torch.Tensor) -> np.ndarray:
    w = (crop.float().mean(0) > 200).float()  # the disc
    yy, xx = torch.meshgrid(torch.arange(w.shape[0]), torch.arange(w.shape[1]), indexing="ij")
    return np.array([float((w * yy).sum() / w.sum()), float((w * xx).sum() / w.sum())])


def test_reduced_dct_decode_keeps_the_crop_geometry():
    out = 32
    assert [draft_scale(CropParams(0, 0, h, h, False), out) for h in (63, 64, 127, 128, 255, 256, 1000)] == \
        [1, 2, 2, 4, 4, 8, 8]
    rng = np.random.default_rng(0)
    scales = set()
    for width, height in ((1003, 771), (640, 480), (517, 1024)):
        for out in (224, 160, 112, 64, 32):
            p = sample_crop((width, height), rng, scale=(0.3, 1.0))
            cx, cy = p.j + p.w * rng.uniform(0.3, 0.7), p.i + p.h * rng.uniform(0.3, 0.7)
            data = _jpeg_with_disc(width, height, cx, cy, min(p.h, p.w) / 6)
            full = to_uint8(crop_resize(Image.open(io.BytesIO(data)).convert("RGB"), p, out))
            img = Image.open(io.BytesIO(data))
            s = open_reduced(img, p, out)
            assert s == draft_scale(p, out) and img.convert("RGB").size == (-(-width // int(s)), -(-height // int(s)))
            scales.add(s)
            reduced = to_uint8(crop_resize(img.convert("RGB"), p, out, scale=s))
            # same place in the output: the disc's centroid moves by less than a quarter of an output pixel
            assert np.abs(_centroid(reduced) - _centroid(full)).max() < 0.25
            assert (reduced.float() - full.float()).abs().mean() < 3  # of 255: same picture
    assert scales >= {1.0, 2.0, 4.0, 8.0}
    # a crop under twice the output size, or a PNG, decodes fully
    png = io.BytesIO()
    Image.new("RGB", (600, 600)).save(png, format="PNG")
    out = 32
    assert open_reduced(Image.open(png), CropParams(0, 0, 600, 600, False), out) == 1.0
    small = Image.open(io.BytesIO(_jpeg_with_disc(600, 600, 300, 300, 20)))
    assert open_reduced(small, CropParams(0, 0, 63, 63, False), out) == 1.0 and small.size == (600, 600)
