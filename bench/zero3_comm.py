"""One pass per micro-step: ZeRO-3 collectives, GEMM padding and CPU step time, packed vs three-pass.

    .venv/bin/python bench/zero3_comm.py [--variants tiny wide] [--steps 3] [--warmup 2] [--time-steps 5]

1. ZeRO-3 collectives per optimizer step (DeepSpeed's comms logger, ``zero3_bf16.json``, 2 CPU
   ranks over gloo, launched here with ``deepspeed --num_gpus 2``): all-gather and
   reduce-scatter calls and bytes (the logger's message sizes) of
   ``three_pass`` (``three_pass_mdm_loss``: images, texts, pairs, one forward each),
   ``packed`` (``mdm_loss``, the default: one packed forward of all three) and
   ``single fused`` (``three_pass_mdm_loss`` on the pairs only: one fused forward, the floor),
   in the same process. Micro-batch per rank: 4 images + 4 texts + 4 pairs, 16 text tokens
   (as ``../shared/probes/zero3_comm.py``), ``--warmup`` unmeasured steps before each case (ZeRO-3
   re-traces its prefetch order after the step changes). Goal: packed within 1.2x of single fused.
2. Padding fraction of the backbone's GEMM rows (every nn.Linear/patch conv input row) with
   COCO-like captions (10-30 tokens, padded to 64) and texts (20-64 of 64): rows measured by
   hooks, against the rows of the same samples run one at a time unpadded. Goal: 0.
3. CPU step time (forward + backward, fp32, one thread, process CPU time, median of
   ``--time-steps`` after a warm-up, the two steps interleaved), packed / three-pass, same model
   and batch, one process.

``--variants``: ``tiny`` (the tiny preset, 64 wide) and ``wide`` (tiny widened to 384/6 heads/1536).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parent.parent
WIDE = {"embed_dim": 384, "num_heads": 6, "ffn_dim": 1536}
GOAL = 1.2


def model_config(variant: str):
    from beit3.model import get_config

    return get_config("tiny", vocab_size=1000, num_visual_tokens=128, **(WIDE if variant == "wide" else {}))


def make_batch(cfg, B: int, text_len: int, pair_len: int, text_lens=None, pair_lens=None, seed: int = 0):
    """A micro-batch of images, texts and pairs; ``*_lens``: real tokens per row (right padding)."""
    g = torch.Generator().manual_seed(seed)
    P = cfg.num_patches

    def src(kind: str, L: int, lens):
        d = {}
        if kind != "text":
            d["images"] = torch.randn(B, 3, cfg.img_size, cfg.img_size, generator=g)
            m = torch.zeros(B, P, dtype=torch.bool)
            m[:, : max(1, int(0.4 * P))] = True
            d["image_mask"] = m
            d["codes"] = torch.randint(0, cfg.num_visual_tokens, (B, P), generator=g)
        if kind != "image":
            lens_t = torch.full((B,), L) if lens is None else torch.as_tensor(lens)
            pad = torch.arange(L)[None] >= lens_t[:, None]
            d["text_ids"] = torch.randint(4, cfg.vocab_size - 1, (B, L), generator=g).masked_fill(pad, 1)
            d["text_labels"] = d["text_ids"].clone()
            tm = torch.zeros(B, L, dtype=torch.bool)
            tm[:, 2:6] = True
            d["text_mask"] = tm & ~pad
            d["padding_mask"] = pad
        return d

    return {"image": src("image", 0, None), "text": src("text", text_len, text_lens),
            "pair": src("pair", pair_len, pair_lens)}


# ---- 1. collectives (worker: one deepspeed launch per variant) ------------------------------------------
def comm_snapshot() -> dict[str, tuple[int, int]]:
    import deepspeed

    out = {}
    for op, sizes in deepspeed.comm.comms_logger.comms_dict.items():
        out[op] = (sum(v[0] for v in sizes.values()), sum(int(s) * v[0] for s, v in sizes.items()))
    return out


def comm_worker(variant: str, steps: int, warmup: int, out_path: str) -> None:
    from beit3.model import BEiT3ForPretraining
    from beit3.runtime.engine import build_engine, fill_batch_fields, init_distributed, load_ds_config
    from beit3.pretrain.objective import mdm_loss, three_pass_mdm_loss
    from beit3.runtime.optim import OptimConfig, param_groups

    rank, world, dev = init_distributed()
    torch.manual_seed(0)
    cfg = model_config(variant)
    model = BEiT3ForPretraining(cfg)
    nparam = sum(p.numel() for p in model.parameters())
    ds = load_ds_config("zero3_bf16.json")
    ds["comms_logger"] = {"enabled": True, "verbose": False, "prof_all": True, "debug": False}
    ds = fill_batch_fields(ds, 12, world)
    engine, _, _ = build_engine(model, ds, param_groups(model, 0.05, 1e-3), OptimConfig())
    full = make_batch(cfg, 4, 16, 16)
    cases = {"three_pass": (three_pass_mdm_loss, full), "packed": (mdm_loss, full),
             "single_fused": (three_pass_mdm_loss, {"pair": full["pair"]})}
    res = {"params": nparam, "param_bytes_bf16": 2 * nparam}
    for name, (fn, batch) in cases.items():
        def run(n: int) -> None:
            for _ in range(n):
                r = fn(engine, batch, None, dev, torch.bfloat16)
                engine.backward(r.loss)
                engine.step()
        run(warmup)  # ZeRO-3 re-traces the module order after a change of step
        a = comm_snapshot()
        run(steps)
        b = comm_snapshot()
        res[name] = {op: [(b[op][0] - a.get(op, (0, 0))[0]) / steps, (b[op][1] - a.get(op, (0, 0))[1]) / steps]
                     for op in b}
    if rank == 0:
        Path(out_path).write_text(json.dumps(res, indent=1))


def launch_comm(variant: str, steps: int, warmup: int) -> dict:
    out = Path(tempfile.mkdtemp()) / f"{variant}.json"
    from beit3.runtime.ports import reserve_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with reserve_port() as port:  # held until the job ended (runtime.ports)
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
               str(Path(__file__).resolve()), "--worker", variant, "--steps", str(steps), "--warmup", str(warmup),
               "--out", str(out)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"comm worker {variant} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(out.read_text())


def comm_rows(variant: str, res: dict) -> list[str]:
    pb = res["param_bytes_bf16"]
    rows = []
    base = res["single_fused"]
    for case in ("three_pass", "packed", "single_fused"):
        cells = [variant, f"{res['params'] / 1e6:.2f}M", case]
        for op in ("all_gather_into_tensor", "reduce_scatter_tensor"):
            n, b = res[case].get(op, [0, 0])
            n0, b0 = base.get(op, [0, 0])
            cells += [f"{n:.0f}", f"{b / pb:.2f}x", f"{n / max(n0, 1):.2f}", f"{b / max(b0, 1):.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


# ---- 2. padding fraction of GEMM rows ------------------------------------------------------------------
def gemm_rows(model: nn.Module, fn) -> int:
    """Input rows of every backbone nn.Linear / the patch conv (batch x tokens) during ``fn()``."""
    count = [0]
    hooks = [m.register_forward_pre_hook(lambda mod, args: count.__setitem__(0, count[0] + args[0].shape[:-1].numel()
                                                                              if isinstance(mod, nn.Linear)
                                                                              else count[0] + args[0].shape[0]))
             for name, m in model.named_modules() if name.startswith("beit3.") and isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in hooks:
            h.remove()
    return count[0]


def one_at_a_time(batch: dict) -> list[dict]:
    """Every sample alone, its text cut to its real length: the padding-free row count."""
    out = []
    for source, src in batch.items():
        n = len(src["images"] if "images" in src else src["text_ids"])
        for i in range(n):
            one = {k: v[i:i + 1] for k, v in src.items()}
            if "padding_mask" in one:
                L = int((~one["padding_mask"]).sum())
                one = {k: (v[:, :L] if k in ("text_ids", "text_labels", "text_mask", "padding_mask") else v)
                       for k, v in one.items()}
            out.append({source: one})
    return out


def padding_and_time(variant: str, time_steps: int) -> dict:
    from beit3.model import BEiT3ForPretraining
    from beit3.pretrain.objective import mdm_loss, three_pass_mdm_loss

    torch.manual_seed(0)
    cfg = model_config(variant)
    model = BEiT3ForPretraining(cfg)
    g = torch.Generator().manual_seed(1)
    B = 8
    pair_lens = torch.randint(10, 31, (B,), generator=g)  # COCO-like captions
    text_lens = torch.randint(20, 65, (B,), generator=g)
    batch = make_batch(cfg, B, 64, 64, text_lens, pair_lens)
    cpu = torch.device("cpu")
    real = sum(gemm_rows(model, lambda b=b: three_pass_mdm_loss(model, b, None, cpu)) for b in one_at_a_time(batch))
    out = {"real_rows": real}
    fns = {"three_pass": three_pass_mdm_loss, "packed": mdm_loss}
    for name, fn in fns.items():
        rows = gemm_rows(model, lambda fn=fn: fn(model, batch, None, cpu))
        out[name] = {"rows": rows, "padding": 1 - real / rows}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(time_steps + 1):  # interleaved, process CPU time: robust to other load on the machine
        for name, fn in fns.items():
            model.zero_grad(set_to_none=True)
            t0 = time.process_time()
            fn(model, batch, None, cpu).loss.backward()
            if i:
                times[name].append(time.process_time() - t0)
    for name in fns:
        out[name]["ms"] = 1000 * statistics.median(times[name])
    out["pair_lens"], out["text_lens"] = pair_lens.tolist(), text_lens.tolist()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["tiny", "wide"], choices=["tiny", "wide"])
    ap.add_argument("--steps", type=int, default=3, help="measured optimizer steps per case (after 1 warm-up)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured optimizer steps before each case")
    ap.add_argument("--time-steps", type=int, default=10)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return comm_worker(args.worker, args.steps, args.warmup, args.out)
    torch.set_num_threads(1)
    t0 = time.time()
    comm = {v: launch_comm(v, args.steps, args.warmup) for v in args.variants}
    print("## ZeRO-3 collectives per optimizer step (2 CPU ranks, zero3_bf16.json, comms logger)\n")
    print("bytes as multiples of the bf16 parameter bytes; 'vs fused' = ratio to the single fused forward\n")
    print("| variant | params | step | all-gathers | gathered bytes | calls vs fused | bytes vs fused "
          "| reduce-scatters | scattered bytes | calls vs fused | bytes vs fused |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v, res in comm.items():
        print("\n".join(comm_rows(v, res)))
    print()
    for v, res in comm.items():
        ag = "all_gather_into_tensor"
        p, f, t = (res[c].get(ag, [0, 0]) for c in ("packed", "single_fused", "three_pass"))
        calls, byts = p[0] / max(f[0], 1), p[1] / max(f[1], 1)
        met = "MET" if calls <= GOAL and byts <= GOAL else "NOT met"
        print(f"{v}: packed all-gathers = {calls:.2f}x calls, {byts:.2f}x bytes of single fused (goal <= {GOAL}x: "
              f"{met}); three-pass was {t[0] / max(f[0], 1):.2f}x calls, {t[1] / max(f[1], 1):.2f}x bytes")
    print("\n## GEMM padding (COCO-like captions 10-30 of 64, texts 20-64 of 64, 8 per source) and CPU step time\n")
    print("fp32, 1 thread, forward + backward, process CPU time, median of", args.time_steps,
          "interleaved steps after a warm-up\n")
    print("| variant | step | GEMM rows | real-token rows | padding fraction (goal 0) | ms/step | vs three-pass |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for v in args.variants:
        r = padding_and_time(v, args.time_steps)
        for case in ("three_pass", "packed"):
            print(f"| {v} | {case} | {r[case]['rows']} | {r['real_rows']} | {r[case]['padding']:.3f} | "
                  f"{r[case]['ms']:.1f} | {r[case]['ms'] / r['three_pass']['ms']:.2f} |")
    print(f"\ntorch {torch.__version__}; wall {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
