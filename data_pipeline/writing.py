"""Helpers shared by the shard-writing command-line tools."""
from __future__ import annotations

import argparse
import io
import logging
from collections import Counter
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)

_EXT = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp", ".bmp": "bmp", ".ppm": "ppm",
        ".tif": "tif", ".tiff": "tif"}
IMAGE_SUFFIXES = tuple(_EXT)


def add_shard_args(p: argparse.ArgumentParser, prefix: str, maxcount: int) -> None:
    p.add_argument("--prefix", default=prefix, help=f"shard file prefix (default {prefix})")
    p.add_argument("--maxcount", type=int, default=maxcount, help=f"samples per shard (default {maxcount})")
    p.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard (default 1e9)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def image_member(path: Path, verify: bool = True) -> tuple[str, bytes]:
    """(webdataset extension, original file bytes); raises ``ValueError`` for an unusable image.
    The bytes are stored as they are (no re-encoding)."""
    ext = _EXT.get(path.suffix.lower())
    if ext is None:
        raise ValueError(f"{path}: not an image file suffix")
    data = path.read_bytes()
    if verify:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise ValueError(f"{path}: {e}") from None
    return ext, data


def report(tool: str, written: int, skipped: Counter, manifest: Path) -> None:
    msg = f"{tool}: wrote {written} samples; manifest {manifest}"
    if skipped:
        msg += f"; skipped {sum(skipped.values())} ({dict(skipped)})"
    print(msg)


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
