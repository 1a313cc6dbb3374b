"""Size a pretraining run before launch: memory per GPU, time, data rate, checkpoints and faults.

    python -m beit3.pretrain.plan --config pretrain/configs/base.yaml \
        --deepspeed_config ds_configs/zero3_bf16.json --gpus 64 --gpu h100 [--json]

Memory: model states from the ZeRO sharding arithmetic, ZeRO-3 buffers from the JSON, and
activations MEASURED by one forward + backward of the real model on the meta device
(``plan_memory.py``). Time: the FLOPs the training step logs for MFU (``objective.real_token_flops``)
at an MFU measured in ``bench/results/mfu.md`` (a ``| gpu | mfu |`` row) or 0.35, "assumed".
Data: loader cores at the per-core rates of ``bench/results/data_pipeline.md``. Faults: the
Young/Daly checkpoint interval from a per-GPU failure rate (Llama 3 report: 419 unexpected
interruptions in 54 days on 16,384 H100s), the arithmetic of ``runtime/save_interval.py`` that
``run.save_every: auto`` uses at start-up. See docs/planning.md.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from beit3.data_pipeline import check_batch_arithmetic
from beit3.model.config_io import load_config
from beit3.pretrain import plan_memory as pm
from beit3.pretrain.feed import loader_rates
from beit3.pretrain.train import TrainConfig
from beit3.runtime import save_interval as si
from beit3.runtime.engine import load_ds_config

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DEFAULT_MFU = 0.35
GPUS_PER_NODE = 8
def measured_mfu(gpu: str, path: Path = RESULTS / "mfu.md") -> tuple[float, str]:
    """A measured MFU for ``gpu`` (a ``| h100 | 0.41 |`` row of bench/results/mfu.md), else 0.35 assumed."""
    if path.is_file():
        m = re.search(rf"^\|\s*{re.escape(gpu)}\s*\|\s*([\d.]+)\s*\|", path.read_text(), re.M | re.I)
        if m:
            return float(m.group(1)), f"measured ({path.relative_to(REPO)})"
    return DEFAULT_MFU, "assumed"


# ---- memory -------------------------------------------------------------------------------------
def _accums(per_rank: dict[str, int], start: int) -> list[int]:
    """Accumulations a >= start that divide every per-rank (accum 1) count, ascending."""
    counts = [n for n in per_rank.values() if n]
    g = math.gcd(*counts)
    return [a for a in range(start, g + 1) if g % a == 0]


def tokenizer_plan(cfg: TrainConfig) -> dict[str, Any]:
    """The frozen VQ-KD that makes the MIM targets online (no ``data.offline_codes``): its GPU bytes
    (fp32, every rank: ``VisualTokenTargets`` loads it unsharded) and forward FLOPs per image,
    counted by ``FlopCounterMode`` over the meta encoder + codebook search. The checkpoint is not
    read: the ``base`` preset at the model's patch grid (the released 768x12 encoder), labelled."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from beit3.model.vqkd import VQKD
    from beit3.model.vqkd.config import get_vqkd_config

    d = cfg.data
    if d.offline_codes or not (d.images or d.pairs):
        return {"online": False, "numel": 0, "bytes": 0, "flops_per_image": 0.0, "step_flops": 0.0}
    vc = get_vqkd_config("base", img_size=d.img_size, patch_size=d.patch_size)
    with torch.device("meta"):
        tok = VQKD(vc)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        z = tok.encode_task_layer(tok.encoder(torch.empty(1, 3, vc.img_size, vc.img_size, device="meta")))
        tok.quantize.nearest(F.normalize(z, dim=-1))
    numel = sum(p.numel() for p in tok.parameters())
    per_image = float(fc.get_total_flops())
    return {"online": True, "numel": numel, "bytes": 4 * numel, "flops_per_image": per_image,
            "step_flops": per_image * (d.images + d.pairs), "assumed": "VQ-KD base preset (checkpoint not read)"}


def _fit(cfg: TrainConfig, mc: Any, per_rank: dict[str, int], start: int, fixed: float, capacity: float,
         dtype: torch.dtype, model: Any, acts: dict) -> tuple[Optional[int], Optional[dict]]:
    """The smallest accumulation (largest micro-batch) whose measured peak fits ``capacity``."""
    key = "ckpt" if cfg.model.grad_checkpointing else "no_ckpt"
    for a in _accums(per_rank, start)[:8]:  # measured at each candidate micro-batch until one fits
        m = {s: n // a for s, n in per_rank.items()}
        act = acts if a == start else pm.measure_activations(mc, cfg.data, m, dtype, model)
        if fixed + act[key].peak <= capacity:
            return a, m
    return None, None


def memory_plan(cfg: TrainConfig, ds: dict, gpus: int, gpu: str) -> dict[str, Any]:
    z = pm.zero_setup(ds)
    mc = cfg.model.build_config()
    dtype = torch.bfloat16 if z.bf16 else torch.float32
    model = pm.build_model(mc, "meta", dtype)
    numels = [p.numel() for p in model.parameters()]
    numel, largest = sum(numels), pm.largest_layer_numel(model)
    stages = {f"zero{s}": pm.model_state_bytes(numels, gpus, s, z.bf16, z.grad_bytes) for s in range(4)}
    stages[f"zero{z.stage}+offload"] = pm.model_state_bytes(numels, gpus, z.stage, z.bf16, z.grad_bytes, True)
    states = pm.model_state_bytes(numels, gpus, z.stage, z.bf16, z.grad_bytes, z.offload_optimizer)
    buffers = pm.zero3_buffers(z, numel, largest, pm.persistent_numel(model, z.persistence))
    tok = tokenizer_plan(cfg)
    fixed = sum(states.values()) + sum(v for k, v in buffers.items() if k != "max_live_cap") + tok["bytes"]
    capacity = pm.GPUS[gpu][0] * (1 - pm.HEADROOM)
    per_rank = check_batch_arithmetic(cfg.data, gpus, 1)
    micro = {s: n // z.accum for s, n in per_rank.items()}
    acts = pm.measure_activations(mc, cfg.data, micro, dtype, model)
    ckpt_key = "ckpt" if cfg.model.grad_checkpointing else "no_ckpt"
    peak = fixed + acts[ckpt_key].peak
    fit_accum, fit_micro = _fit(cfg, mc, per_rank, z.accum, fixed, capacity, dtype, model, acts)
    return {"numel": numel, "largest_layer": largest, "zero": z.__dict__, "stages": stages, "states": states,
            "buffers": buffers, "tokenizer": tok, "micro": micro,
            "activations": {k: v.__dict__ | {"peak": v.peak} for k, v in acts.items()},
            "grad_checkpointing": cfg.model.grad_checkpointing, "peak": peak, "capacity": capacity,
            "fits": peak <= capacity, "fit_accum": fit_accum, "fit_micro": fit_micro,
            "micro_flops": acts[ckpt_key].flops}


# ---- time, data, faults -------------------------------------------------------------------------
def time_plan(cfg: TrainConfig, mem: dict, gpus: int, gpu: str, mfu: Optional[float] = None) -> dict[str, Any]:
    source = "given"
    if mfu is None:
        mfu, source = measured_mfu(gpu)
    accum = mem["zero"]["accum"]
    step_flops = mem["micro_flops"] * accum * gpus  # real_token_flops of one rank's micro-batch
    step_s = step_flops / (gpus * pm.GPUS[gpu][1] * 1e12 * mfu)
    days = step_s * cfg.optim.total_steps / 86400
    return {"step_flops": step_flops, "tokenizer_flops": mem["tokenizer"]["step_flops"], "mfu": mfu,
            "mfu_source": source, "step_s": step_s, "days": days, "gpu_days": days * gpus,
            "total_steps": cfg.optim.total_steps}


def data_plan(cfg: TrainConfig, tm: dict, gpus: int) -> dict[str, Any]:
    rates = loader_rates()
    d = cfg.data
    per_gpu = {s: getattr(d, s + "s") / tm["step_s"] / gpus for s in ("image", "text", "pair")}
    cores = sum(per_gpu[s] / rates[s] for s in per_gpu)
    return {"images_per_s": (d.images + d.pairs) / tm["step_s"], "per_gpu": per_gpu, "rates": rates,
            "cores_per_gpu": cores}


def fault_plan(mem: dict, tm: dict, gpus: int, mtbf_hours: Optional[float], write_gbs: float,
               restart_min: float) -> dict[str, Any]:
    n, bf16 = mem["numel"], mem["zero"]["bf16"]
    sharded = n * ((2 + 4) if bf16 else 4) + n * 8  # model states (16-bit + fp32 master) + Adam moments
    nodes = max(1, math.ceil(gpus / GPUS_PER_NODE))
    save_s = sharded / (write_gbs * 1e9 * nodes)
    source = "given"
    if mtbf_hours is None:
        mtbf_hours = si.job_mtbf_hours(gpus)
        source = f"Llama 3: {si.LLAMA3_FAILURES} failures / {si.LLAMA3_DAYS} d / {si.LLAMA3_GPUS} GPUs, x {gpus} GPUs"
    mtbf_s = mtbf_hours * 3600
    interval = si.young_daly_interval(save_s, mtbf_s)
    fails = 86400 / mtbf_s
    lost = 86400 * si.expected_loss_fraction(interval, save_s, mtbf_s, restart_min * 60)
    return {"sharded_bytes": sharded, "export_bf16": 2 * n, "export_fp32": 4 * n, "nodes": nodes,
            "write_gbs_per_node": write_gbs, "save_s": save_s, "mtbf_hours": mtbf_hours, "mtbf_source": source,
            "interval_s": interval, "interval_steps": interval / tm["step_s"], "failures_per_day": fails,
            "restart_min": restart_min, "lost_h_per_day": lost / 3600}


def plan(config: str, deepspeed_config: str, gpus: int, gpu: str, mtbf_hours: Optional[float] = None,
         write_gbs: float = 2.0, restart_min: float = 10.0, mfu: Optional[float] = None) -> dict[str, Any]:
    cfg = load_config(TrainConfig, config, [])
    ds = load_ds_config(deepspeed_config)
    mem = memory_plan(cfg, ds, gpus, gpu)
    tm = time_plan(cfg, mem, gpus, gpu, mfu)
    return {"config": config, "deepspeed_config": deepspeed_config, "gpus": gpus, "gpu": gpu,
            "memory": mem, "time": tm, "data": data_plan(cfg, tm, gpus),
            "faults": fault_plan(mem, tm, gpus, mtbf_hours, write_gbs, restart_min)}


# ---- the table ----------------------------------------------------------------------------------
def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def _memory_rows(m: dict) -> list[tuple[str, str, str]]:
    z = m["zero"]
    rows = [("model", f"{m['numel']:,} params", f"largest layer {m['largest_layer']:,}")]
    for name, st in m["stages"].items():
        rows.append((f"states {name}", _gb(sum(st.values())),
                     f"params {_gb(st['params'])} + grads {_gb(st['grads'])} + optimizer {_gb(st['optimizer'])}"))
    for k, v in m["buffers"].items():
        rows.append((f"zero-3 {k}", _gb(v), "cap, not added" if k == "max_live_cap" else "from the JSON"))
    tok = m["tokenizer"]
    if tok["online"]:
        rows.append(("tokenizer (frozen, fp32)", _gb(tok["bytes"]), f"{tok['numel']:,} params; {tok['assumed']}"))
    for k, a in m["activations"].items():
        rows.append((f"activations {k}", _gb(a["peak"]), f"saved for backward {_gb(a['saved'])} + one block "
                     f"{_gb(a['max_block'])}; measured on meta, micro {m['micro']}"))
    ck = "with" if m["grad_checkpointing"] else "without"
    rows.append(("peak per GPU", _gb(m["peak"]), f"zero{z['stage']} states + buffers + tokenizer + activations {ck} checkpointing"))
    rows.append(("fits (10% headroom)", "yes" if m["fits"] else "NO", f"capacity {_gb(m['capacity'])}"))
    fit = (f"micro {m['fit_micro']} at accumulation {m['fit_accum']}" if m["fit_accum"] else "none of the tried")
    rows.append(("largest micro-batch that fits", fit, "measured at each candidate"))
    return rows


def rows(p: dict) -> list[tuple[str, str, str, str]]:
    t, d, f = p["time"], p["data"], p["faults"]
    out = [("memory", *r) for r in _memory_rows(p["memory"])]
    out += [("time", "FLOPs per optimizer step", f"{t['step_flops']:.3e}", "objective.real_token_flops (the MFU log)"),
            ("time", "tokenizer FLOPs per step (apart)", f"{t['tokenizer_flops']:.3e}",
             f"online VQ-KD forward, {100 * t['tokenizer_flops'] / t['step_flops']:.1f}% of the above; not in MFU"),
            ("time", "MFU", f"{t['mfu']:.3f}", t["mfu_source"]),
            ("time", "step time", f"{t['step_s']:.3f} s", f"{p['gpus']} x {p['gpu']} at {pm.GPUS[p['gpu']][1]} TFLOP/s"),
            ("time", "total", f"{t['days']:.2f} days", f"{t['total_steps']:,} steps; {t['gpu_days']:.0f} GPU-days")]
    out += [("data", "images/s (images + pairs)", f"{d['images_per_s']:.0f}", "whole job"),
            ("data", "loader cores per GPU", f"{d['cores_per_gpu']:.1f}",
             "at " + ", ".join(f"{s} {r:g}/s/core" for s, r in d["rates"].items()) + " (bench/results/data_pipeline.md)")]
    out += [("faults", "checkpoint (sharded)", _gb(f["sharded_bytes"]), "16-bit params + fp32 master + Adam moments"),
            ("faults", "export", f"{_gb(f['export_bf16'])} bf16 / {_gb(f['export_fp32'])} fp32", "weights only"),
            ("faults", "save time", f"{f['save_s']:.1f} s", f"{f['write_gbs_per_node']} GB/s per node x "
                                                              f"{f['nodes']} nodes (assumed)"),
            ("faults", "job MTBF", f"{f['mtbf_hours']:.1f} h", f["mtbf_source"]),
            ("faults", "Young/Daly interval", f"{f['interval_s'] / 60:.1f} min", f"{f['interval_steps']:.0f} steps"),
            ("faults", "lost per day", f"{f['lost_h_per_day'] * 60:.1f} min",
             f"saves + rework/2 + {f['restart_min']:g} min restart per failure (assumed)")]
    return out


def format_table(p: dict) -> str:
    head = f"{p['config']} + {p['deepspeed_config']} on {p['gpus']} x {p['gpu']}\n\n"
    lines = ["| part | item | value | note |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(p)]
    return head + "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="size a BEiT-3 pretraining run before launch")
    ap.add_argument("--config", required=True)
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default="zero3_bf16.json")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu", choices=sorted(pm.GPUS), default="h100")
    ap.add_argument("--mtbf-hours", type=float, default=None, help="job MTBF (default: Llama 3 rate x --gpus)")
    ap.add_argument("--write-bandwidth-gbs", type=float, default=2.0, help="checkpoint write GB/s per node")
    ap.add_argument("--restart-minutes", type=float, default=10.0)
    ap.add_argument("--mfu", type=float, default=None, help="override the MFU")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    p = plan(a.config, a.deepspeed_config, a.gpus, a.gpu, a.mtbf_hours, a.write_bandwidth_gbs, a.restart_minutes,
             a.mfu)
    print(json.dumps(p, indent=1, default=str) if a.json else format_table(p))
    return p


def run(argv: list[str]) -> int:
    """``main`` as a process: 0, or 2 with one line on a configuration error (e.g. batch arithmetic)."""
    from beit3.model.config import ConfigError

    try:
        main(argv)
    except ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
