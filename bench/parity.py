"""Parity of our BEiT-3 with the official implementation (microsoft/torchscale ``BEiT3``).

Both models hold the same (randomly perturbed) weights, loaded into ours through
``model/convert.py``; prints the max abs difference of the outputs per mode, in fp32.

    python bench/parity.py --presets tiny base large
"""
from __future__ import annotations

import argparse
import time


import torch

from beit3.model import get_config
from beit3.testing.official_reference import parity


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "base"])
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for preset in args.presets:
        t0 = time.time()
        d = parity(get_config(preset), batch=args.batch, text_len=args.text_len)
        rows.append((preset, d, time.time() - t0))
    modes = ["vision", "text+padding", "fused+padding", "fused+captioning"]
    print(f"| preset | {' | '.join(modes)} | max abs output | seconds |")
    print("|---" * (len(modes) + 3) + "|")
    for preset, d, secs in rows:
        print(f"| {preset} | " + " | ".join(f"{d[m]:.2e}" for m in modes) + f" | {d['output_scale']:.2f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
