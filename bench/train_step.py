"""Throughput of one pretraining step: samples/s, TFLOP/s and MFU, as a table.

    python bench/train_step.py --preset base --ds zero3_bf16.json --batch 32 --steps 10
    python bench/train_step.py --preset large --ds zero3_bf16.json --batch 32 --grad-ckpt both

One optimizer step = the pretraining micro-step of ``pretrain.objective.mdm_loss``: ``--batch``
images (MIM), ``--batch`` texts (MLM, 15% masked) and ``--batch`` image-text pairs (MIM + MLM,
50% of the text masked) through the same model, backward and optimizer step. Inputs are random
tensors of the real shapes with offline visual-token codes (the tokenizer's own cost is in
``bench/targets``-style tables of the tokenizer issue), so this measures the model + engine.

Rows, all in this process on the same inputs:
  * ``torch`` (baseline): the plain PyTorch loop, torch.optim.AdamW, bf16 autocast on GPU;
  * ``deepspeed <config>``: ``pretrain.engine.build_engine`` with the DeepSpeed JSON, as training does;
  * with ``--grad-ckpt both``: the DeepSpeed row again with activation checkpointing;
  * ``--objective both``: DeepSpeed rows of the three-pass baseline and the packed step;
    ``--compile both``: each also with per-block ``torch.compile`` (``model.compile: true``).
TFLOP/s count model matmul FLOPs (3x forward, recompute not counted, as MFU is defined); MFU is
against the device's dense bf16 peak (``pretrain.telemetry.device_peak_tflops``) or ``--peak-tflops``.
Runs on one process (world size 1); on CPU it works but the numbers only compare rows.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from beit3.model.config import get_config
from beit3.model.heads import BEiT3ForPretraining
from beit3.runtime.engine import build_engine, engine_dtype, fill_batch_fields, load_ds_config
from beit3.pretrain.objective import mdm_loss, three_pass_mdm_loss

OBJECTIVES = {"packed": mdm_loss, "three_pass": three_pass_mdm_loss}
from beit3.runtime.optim import OptimConfig, param_groups
from beit3.runtime.telemetry import device_peak_tflops
from beit3.runtime.engine import ensure_process_group_env, select_device
from step_profile import profile_steps, table as profile_table  # a script beside this one (bench/ is on sys.path)


def make_batch(cfg, batch: int, text_len: int, pair_text_len: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random inputs of the pretraining shapes (40% patches, 15% / 50% text tokens masked)."""
    g = torch.Generator().manual_seed(seed)
    P = cfg.num_patches

    def image_part() -> dict[str, torch.Tensor]:
        mask = torch.rand(batch, P, generator=g).argsort(1) < round(0.4 * P)
        return {"images": torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=g), "image_mask": mask,
                "codes": torch.randint(0, cfg.num_visual_tokens, (batch, P), generator=g)}

    def text_part(length: int, ratio: float) -> dict[str, torch.Tensor]:
        ids = torch.randint(4, cfg.vocab_size, (batch, length), generator=g)
        mask = torch.rand(batch, length, generator=g).argsort(1) < max(1, round(ratio * length))
        return {"text_ids": ids.masked_fill(mask, 3), "text_labels": ids, "text_mask": mask,
                "padding_mask": torch.zeros(batch, length, dtype=torch.bool)}

    return {"image": image_part(), "text": text_part(text_len, 0.15),
            "pair": {**image_part(), **text_part(pair_text_len, 0.5)}}


def step_flops(model: BEiT3ForPretraining, batch: int, text_len: int, pair_text_len: int) -> float:
    cfg = model.config
    S, masked = cfg.num_vision_tokens, round(0.4 * cfg.num_patches)
    return batch * (model.flops_per_sample(S, 0, num_masked_patches=masked)
                    + model.flops_per_sample(0, text_len, num_masked_text=max(1, round(0.15 * text_len)))
                    + model.flops_per_sample(S, pair_text_len, num_masked_patches=masked,
                                             num_masked_text=max(1, round(0.5 * pair_text_len))))


def timed(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Seconds per step after ``warmup`` steps."""
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def torch_row(args, cfg, data, device) -> Callable[[], None]:
    model = BEiT3ForPretraining(cfg).to(device)
    if args.grad_ckpt_on:
        model.set_grad_checkpointing(True)
    optim = OptimConfig()
    opt = torch.optim.AdamW(param_groups(model, optim.weight_decay, optim.lr), lr=optim.lr,
                            betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            loss = mdm_loss(model, data, None, device, torch.float32).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def deepspeed_row(args, cfg, data, device, grad_ckpt: bool, objective: str = "packed",
                  compiled: bool = False) -> Callable[[], None]:
    model = BEiT3ForPretraining(cfg)
    if grad_ckpt:
        model.set_grad_checkpointing(True)
    if compiled:
        model.beit3.compile_blocks()
    loss_fn = OBJECTIVES[objective]
    ds = fill_batch_fields(load_ds_config(args.ds), 3 * args.batch, 1)
    ds["gradient_accumulation_steps"] = 1
    optim = OptimConfig()
    engine, _, _ = build_engine(model, ds, param_groups(model, optim.weight_decay, optim.lr), optim)
    dtype = engine_dtype(engine)

    def step() -> None:
        loss = loss_fn(engine, data, None, engine.device, dtype).loss
        engine.backward(loss)
        engine.step()

    return step


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--ds", default="zero3_bf16.json", help="DeepSpeed JSON (a path or a name in ds_configs/)")
    ap.add_argument("--batch", type=int, default=8, help="samples per source per step (images = texts = pairs)")
    ap.add_argument("--text-len", type=int, default=128, help="text-only sequence length")
    ap.add_argument("--pair-text-len", type=int, default=64, help="text length inside image-text pairs")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attn-backend", default="auto", choices=["auto", "math", "sdpa", "triton"])
    ap.add_argument("--grad-ckpt", default="off", choices=["off", "on", "both"],
                    help="activation checkpointing: off, on, or both (two DeepSpeed rows)")
    ap.add_argument("--objective", default="packed", choices=["packed", "three_pass", "both"],
                    help="DeepSpeed rows: the packed single pass (default step), the three-pass baseline, or both")
    ap.add_argument("--compile", default="off", choices=["off", "on", "both"],
                    help="DeepSpeed rows with per-block torch.compile (model.compile): off, on, or both")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain-PyTorch row")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also N steps of each row under torch.profiler (sync calls, idle gaps) and N more "
                         "counting host waits (bench/step_profile.py)")
    ap.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = ap.parse_args(argv)
    args.grad_ckpt_on = args.grad_ckpt == "on"
    ensure_process_group_env()
    device = select_device()[1]  # BEIT3_DEVICE / auto, as training chooses (the CPU test tier: cpu)
    on_gpu = device.type == "cuda"
    cfg = get_config(args.preset, attn_backend=args.attn_backend, drop_path_rate=0.1)
    args.text_len = min(args.text_len, cfg.max_text_positions - 2)  # tiny has 128 positions
    args.pair_text_len = min(args.pair_text_len, cfg.max_text_positions - 2)
    data = make_batch(cfg, args.batch, args.text_len, args.pair_text_len)
    with torch.device("meta"):  # FLOPs need the config only
        meta = BEiT3ForPretraining(cfg)
    flops = step_flops(meta, args.batch, args.text_len, args.pair_text_len)
    peak = args.peak_tflops or (device_peak_tflops() if on_gpu else None)
    variants: list[tuple[str, Callable[[], Callable[[], None]]]] = []
    if not args.no_baseline:
        variants.append((f"torch{' +ckpt' if args.grad_ckpt_on else ''}", lambda: torch_row(args, cfg, data, device)))
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    objectives = ["three_pass", "packed"] if args.objective == "both" else [args.objective]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for obj in objectives:
        for ck in ckpts:
            for comp in compiles:
                variants.append((f"deepspeed {Path(args.ds).stem} {obj}{' +ckpt' if ck else ''}"
                                 f"{' +compile' if comp else ''}",
                                 lambda ck=ck, obj=obj, comp=comp: deepspeed_row(args, cfg, data, device, ck, obj, comp)))
    rows, profiles = [], []
    for name, build in variants:
        step = build()
        sec = timed(step, args.warmup, args.steps)
        mem = torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else float("nan")
        if args.profile:
            profiles.append((name, profile_steps(step, args.profile)))
        tflops = flops / sec / 1e12
        rows.append({"variant": name, "step_s": sec, "samples_per_s": 3 * args.batch / sec, "tflops": tflops,
                     "mfu": tflops / peak if peak else None, "mem_gb": mem})
        del step
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    base = rows[0]["samples_per_s"]
    dev = torch.cuda.get_device_name() if on_gpu else f"CPU ({torch.get_num_threads()} threads)"
    lines = [f"preset {args.preset}, batch {args.batch}+{args.batch}+{args.batch} (images+texts+pairs), text "
             f"{args.text_len}, pair text {args.pair_text_len}, attention {args.attn_backend}, device {dev}, "
             f"{flops / 1e12:.3f} TFLOP per step", "",
             "| variant | s/step | samples/s | TFLOP/s | MFU | peak mem GiB | vs first row |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['variant']} | {r['step_s']:.3f} | {r['samples_per_s']:.1f} | {r['tflops']:.3f} | {mfu} | "
                     f"{r['mem_gb']:.1f} | {r['samples_per_s'] / base:.2f}x |")
    if profiles:
        lines += ["", profile_table(profiles)]
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
