"""Does the loader keep the GPU fed? Samples/s a rank needs at an MFU against what its workers make.

The need: a rank's samples per optimizer step over the step time at ``mfu`` of the device's peak,
the step's FLOPs counted as the MFU log counts them (``flops_per_sample`` of the pretraining model,
texts at their full length: an upper bound on FLOPs, so a lower bound on the need). The supply:
``data.num_workers`` loader workers, one core each, at the per-core rates measured by
``bench/data_pipeline.py`` (``bench/results/data_pipeline.md``, ``augment_on: device``).

Used by the trainer's validation (a warning when the workers fall short at 30% MFU), the planner
(loader cores per GPU) and ``bench/data_pipeline.py`` (the feed table).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import torch

from beit3.data_pipeline import DataConfig

FEED_MFU = 0.30  # the MFU the loader must keep up with (issue 17: 30% on an H200)
RATES_FILE = Path(__file__).resolve().parent.parent / "bench" / "results" / "data_pipeline.md"
# the ours samples/s/core rows of bench/results/data_pipeline.md (augment_on: device, all sizes)
LOADER_ROWS = {"image": r"\| image \| all sizes 256-1024: wds\+torchvision decode, RRC 224, flip, to-tensor \| device \|",
               "pair": r"\| pair \| [^|]*\| device \|", "text": r"\| text \| [^|]*\| - \|"}


def loader_rates(path: Path = RATES_FILE) -> dict[str, float]:
    """Samples/s per loader core by source, parsed from the data-pipeline bench (ours column)."""
    text = path.read_text()
    out = {}
    for source, row in LOADER_ROWS.items():
        m = re.search(row + r"\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|", text)
        if not m:
            raise ValueError(f"{path}: no '{source}' row to read the per-core rate from")
        out[source] = float(m.group(2))
    return out


def sample_flops(model_cfg: Any, data: DataConfig) -> dict[str, float]:
    """Training FLOPs of one sample per source (the MFU log's count), texts at full length."""
    from beit3.model import BEiT3ForPretraining

    with torch.device("meta"):
        model = BEiT3ForPretraining(model_cfg)
    patches = model_cfg.num_patches
    masked = data.image_mask.num_patches or round(data.image_mask.ratio * patches)
    text, pair = data.max_text_len, data.max_pair_text_len
    return {"image": model.flops_per_sample(patches + 1, 0, num_masked_patches=masked),
            "text": model.flops_per_sample(0, text, num_masked_text=round(data.text_mask.text_ratio * text)),
            "pair": model.flops_per_sample(patches + 1, pair, num_masked_patches=masked,
                                           num_masked_text=round(data.text_mask.pair_ratio * pair))}


def need_per_rank(model_cfg: Any, data: DataConfig, world_size: int, peak_tflops: float,
                  mfu: float = FEED_MFU) -> dict[str, float]:
    """Samples/s per source one rank consumes when its steps run at ``mfu`` of ``peak_tflops``."""
    per_sample = sample_flops(model_cfg, data)
    counts = {s: data.count(s) / world_size for s in ("image", "text", "pair")}
    step_s = sum(counts[s] * per_sample[s] for s in counts) / (peak_tflops * 1e12 * mfu)
    return {s: n / step_s for s, n in counts.items() if n}


def workers_needed(need: dict[str, float], rates: dict[str, float]) -> float:
    """Loader cores (one per worker) that make ``need`` at ``rates`` samples/s/core."""
    return sum(n / rates[s] for s, n in need.items())


def feed_warning(model_cfg: Any, data: DataConfig, world_size: int, peak_tflops: Optional[float],
                 rates_file: Path = RATES_FILE) -> Optional[str]:
    """A warning line when ``data.num_workers`` cannot feed a rank at 30% MFU, else None (also
    when the peak is unknown, e.g. on CPU without ``run.peak_tflops``, or no rates are measured)."""
    if not peak_tflops or not rates_file.is_file():
        return None
    need = need_per_rank(model_cfg, data, world_size, peak_tflops)
    cores = workers_needed(need, loader_rates(rates_file))
    if data.num_workers >= cores:
        return None
    rate = ", ".join(f"{s} {n:.0f}/s" for s, n in need.items())
    return (f"data.num_workers={data.num_workers} is below the {math.ceil(cores)} loader workers per rank needed at "
            f"{FEED_MFU:.0%} MFU of {peak_tflops:g} TFLOP/s ({rate} per rank, at the per-core rates of "
            f"{rates_file.name}): the GPU will wait for data; raise data.num_workers")


__all__ = ["FEED_MFU", "loader_rates", "sample_flops", "need_per_rank", "workers_needed", "feed_warning"]
