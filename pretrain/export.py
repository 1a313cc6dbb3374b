"""Consolidated weights from sharded ZeRO checkpoints, without the training cluster.

    python -m beit3.pretrain.export runs/x/checkpoints --out exported/ [--tag step_00001000]
        [--dtype bf16] [--official]

Writes ``model.safetensors`` (our parameter names) and ``config.json`` (the model config and
where it came from) after verifying every shard's size and checksum against the tag's
``COMPLETE`` manifest; ``--official`` also writes ``beit3_official.pth`` in the layout of the
official BEiT-3 release (``{"model": state_dict}`` with ``beit3.``/``A``/``B`` names), which
the official fine-tuning code loads. The shards are memory-mapped and each tensor is gathered
and written on its own, so peak memory stays about one copy of the weights.
"""
from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from tqdm import tqdm

from beit3.model.config import BEiT3Config
from beit3.model.convert import ours_to_official
from beit3.model.safe_load import load_untrusted
from beit3.runtime.checkpointing import CLIENT_KEY, CheckpointError, CheckpointManager

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
              torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def write_safetensors_streaming(tensors: dict[str, Any], path: str, dtype: Optional[torch.dtype] = None,
                                metadata: Optional[dict[str, str]] = None) -> None:
    """Write a safetensors file materializing one tensor at a time.

    ``tensors`` maps names to tensors or lazy tensors with ``.shape``, ``.dtype`` and
    ``.contiguous()`` (DeepSpeed's ``GatheredTensor``). Floating tensors are cast to ``dtype``.
    """
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    out_dtypes = {}
    for name in names:
        t = tensors[name]
        dt = dtype if (dtype is not None and t.dtype.is_floating_point) else t.dtype
        out_dtypes[name] = dt
        nbytes = _numel(t.shape) * torch.empty((), dtype=dt).element_size()
        header[name] = {"dtype": _ST_DTYPES[dt], "shape": [int(s) for s in t.shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte alignment of the data section
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in tqdm(names, desc="writing", unit="tensor", disable=len(names) < 50):
            t = tensors[name].contiguous().to(out_dtypes[name])
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            del t
    os.replace(tmp, path)


def _client_state(tag_dir: str) -> dict[str, Any]:
    files = sorted(glob.glob(os.path.join(tag_dir, "*mp_rank_00_model_states.pt")))
    if not files:
        raise FileNotFoundError(f"no DeepSpeed model-states file in {tag_dir}")
    state = load_untrusted(files[0], allow_numpy=True, mmap=True)  # a checkpoint may come from outside
    return dict(state.get(CLIENT_KEY, {}))  # DeepSpeed merges client_state into the top level


def model_config_of(tag_dir: str) -> BEiT3Config:
    """The model config saved in a checkpoint's client state."""
    from beit3.model import get_config

    cfg = _client_state(tag_dir).get("config", {}).get("model")
    if cfg is None:
        raise ValueError(f"{tag_dir}: the checkpoint does not record its model config")
    return get_config(cfg["preset"], **cfg.get("overrides", {}))


def lazy_state_dict(ckpt_root: str, tag: str) -> dict[str, Any]:
    """Memory-mapped, lazily gathered fp32 weights of a ZeRO 1/2/3 checkpoint."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(ckpt_root, tag=tag, lazy_mode=True)


def export(ckpt_root: str, out_dir: str, tag: str = "auto", dtype: str = "fp32", official: bool = False) -> dict[str, str]:
    """Consolidate ``ckpt_root/tag`` into ``out_dir``; returns the written paths."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(_DTYPES)}")
    manager = CheckpointManager(ckpt_root)
    if tag == "auto":
        tag = manager.latest_tag()
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint under {ckpt_root}")
    elif not manager.is_complete(tag):
        raise FileNotFoundError(f"{os.path.join(ckpt_root, tag)} is missing or incomplete")
    problems = manager.verify(tag)  # every file of every rank: size and checksum against the marker
    if problems:
        raise CheckpointError(f"{os.path.join(ckpt_root, tag)} fails verification, not exporting: "
                              + "; ".join(problems))
    tag_dir = os.path.join(ckpt_root, tag)
    cfg = model_config_of(tag_dir)
    state = lazy_state_dict(ckpt_root, tag)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"weights": os.path.join(out_dir, "model.safetensors"), "config": os.path.join(out_dir, "config.json")}
    write_safetensors_streaming(state, paths["weights"], _DTYPES[dtype],
                                metadata={"format": "pt", "source": tag_dir})
    Path(paths["config"]).write_text(json.dumps({"model": cfg.to_dict(), "source": tag_dir, "tag": tag,
                                                 "dtype": dtype}, indent=2))
    del state  # unmap the checkpoint before the official copy is built: peak stays about one copy
    gc.collect()
    if official:
        from safetensors.torch import load_file

        ours = load_file(paths["weights"])  # one in-memory copy, in the exported dtype
        paths["official"] = os.path.join(out_dir, "beit3_official.pth")
        torch.save({"model": ours_to_official(ours, cfg)}, paths["official"])
    return paths


def main(argv: Optional[list[str]] = None) -> dict[str, str]:
    ap = argparse.ArgumentParser(description="Export consolidated weights from a ZeRO checkpoint")
    ap.add_argument("ckpt_dir", help="the checkpoints folder (holding step_* tags)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="auto", help="step_XXXXXXXX, default: the newest complete one")
    ap.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    ap.add_argument("--official", action="store_true", help="also write the official BEiT-3 .pth layout")
    args = ap.parse_args(argv)
    paths = export(args.ckpt_dir, args.out, args.tag, args.dtype, args.official)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return paths


if __name__ == "__main__":
    main()
