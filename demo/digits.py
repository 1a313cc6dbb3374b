"""Small real data sets for tests, the benchmark and ``make demo`` (no download).

``write_digits_image_folder``: scikit-learn's bundled handwritten digits (8x8 grayscale) upsampled
to RGB PNG/JPEG files in ImageFolder layout. ``write_digits_pairs_tsv``: the same images with
captions. ``write_corpus``: English text from the Python standard library's module docstrings.
scikit-learn is needed (a test extra).
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEMPLATES = ("a handwritten digit {n}", "the number {n} written by hand", "a small grayscale picture of a {n}",
              "scanned handwriting showing the digit {n}", "{n}, drawn with a pen on paper")


def render_digit(image16: np.ndarray, size: int, factors) -> Image.Image:
    """One sklearn digit (8 x 8, values 0-16) as an RGB image ``size`` x ``size``: bicubic upscale of
    the gray levels, each channel scaled by ``factors`` (a tint, or a named colour)."""
    gray = Image.fromarray((np.asarray(image16) * (255.0 / 16.0)).astype(np.uint8), mode="L")
    gray = gray.resize((size, size), Image.Resampling.BICUBIC)
    rgb = (np.asarray(gray, dtype=np.float32)[..., None] * np.asarray(factors)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def digits_images(size: int = 32, limit: int | None = None) -> tuple[list[Image.Image], np.ndarray]:
    """(RGB images size x size, labels) from sklearn's digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs, labels = d.images, d.target
    if limit is not None:
        imgs, labels = imgs[:limit], labels[:limit]
    # a mild per-image tint so that color jitter / normalization see three distinct channels
    tints = [np.array([1.0, 0.85 + 0.15 * (k % 3) / 2, 0.7 + 0.3 * (k % 5) / 4]) for k in range(len(imgs))]
    return [render_digit(im, size, t) for im, t in zip(imgs, tints)], np.asarray(labels)


def write_digits_image_folder(root: str | Path, size: int = 32, limit: int | None = None,
                              fmt: str = "png") -> Path:
    """ImageFolder tree ``root/<digit name>/<k>.<fmt>``; returns root."""
    root = Path(root)
    imgs, labels = digits_images(size, limit)
    for k, (im, y) in enumerate(zip(imgs, labels)):
        d = root / NAMES[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        im.save(d / f"{k:05d}.{fmt}", quality=90) if fmt == "jpg" else im.save(d / f"{k:05d}.{fmt}")
    return root


def caption(label: int, k: int) -> str:
    return _TEMPLATES[k % len(_TEMPLATES)].format(n=NAMES[int(label)])


def write_digits_pairs_tsv(root: str | Path, size: int = 32, limit: int | None = None, quality: int = 90) -> Path:
    """``root/images/*.jpg`` and ``root/pairs.tsv`` (relative path, caption); returns the TSV."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    imgs, labels = digits_images(size, limit)
    lines = ["filepath\tcaption"]
    for k, (im, y) in enumerate(zip(imgs, labels)):
        im.save(root / "images" / f"{k:05d}.jpg", quality=quality)
        lines.append(f"images/{k:05d}.jpg\t{caption(int(y), k)}")
    tsv = root / "pairs.tsv"
    tsv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tsv


def corpus_documents(max_docs: int = 400) -> list[str]:
    """Module docstrings of the standard library (real English prose), one document each."""
    docs = []
    skip = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "pydoc_data"}
    for name in sorted(sys.stdlib_module_names):
        if len(docs) >= max_docs or name.startswith("_") or "test" in name or name in skip:
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - some stdlib/site modules fail to import; not needed
            continue
        doc = (getattr(mod, "__doc__", None) or "").strip()
        if len(doc) > 200:
            docs.append(doc)
    return docs


def write_corpus(path: str | Path, max_docs: int = 400) -> Path:
    """Plain text file: documents separated by a blank line (``write_texts`` default)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    docs = [" ".join(line.strip() for line in d.splitlines() if line.strip()) for d in corpus_documents(max_docs)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m beit3.demo.digits OUT``: OUT/digits (ImageFolder), OUT/corpus.txt,
    OUT/pairs/pairs.tsv (+ images) -- the raw inputs of the shard writers."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m beit3.demo.digits", description=main.__doc__)
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--limit", type=int, default=None, help="first N digits only (default all 1797)")
    p.add_argument("--docs", type=int, default=400, help="max documents in the corpus")
    args = p.parse_args(argv)
    write_digits_image_folder(args.out / "digits", args.size, args.limit)
    write_corpus(args.out / "corpus.txt", args.docs)
    tsv = write_digits_pairs_tsv(args.out / "pairs", args.size, args.limit)
    print(f"demo_data: {args.out / 'digits'} (ImageFolder), {args.out / 'corpus.txt'}, {tsv}")
    return 0


__all__ = ["main", "digits_images", "write_digits_image_folder", "write_digits_pairs_tsv", "write_corpus", "caption",
           "corpus_documents"]


if __name__ == "__main__":
    raise SystemExit(main())


def photo_jpegs(n: int, sizes: tuple[int, ...] = (256, 384, 512, 640, 768, 896, 1024), quality: int = 95,
                seed: int = 0) -> list[bytes]:
    """``n`` JPEGs like img2dataset output: random crops of scikit-learn's two bundled photographs
    (china.jpg, flower.jpg, 640x427) resized so the long side is one of ``sizes`` (in turn), aspect
    ratio in [3/4, 4/3]."""
    import io

    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        src, long_side = photos[k % len(photos)], sizes[k % len(sizes)]
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))  # width / height
        h = int(rng.integers(200, src.height + 1))
        w = min(src.width, int(round(h * aspect)))
        i, j = int(rng.integers(0, src.height - h + 1)), int(rng.integers(0, src.width - w + 1))
        scale = long_side / max(w, h)
        img = src.crop((j, i, j + w, i + h)).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                    Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out
