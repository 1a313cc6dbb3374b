"""``model.compile``: graph breaks, recompiles, compile time and loss against eager over a run of
varying packed lengths (tiny preset, CPU, inductor).

    python -m bench.compile [--steps 50] [--dynamic auto|true]
    python -m bench.compile --deepspeed zero2_bf16.json zero3_bf16.json [--train-steps 6]

Each step is a packed pretraining micro-batch (``mdm_loss``: images, texts and pairs in one pass)
whose text lengths and padded lengths change from step to step, so the packed stream ``[T, D]``
and the layout's index tensors change size every step. The same steps run eagerly and with every
block compiled (``BEiT3.compile_blocks``, what ``model.compile: true`` does under ZeRO stage 1/2;
ZeRO-3 is refused at validation: ``bench/results/compile_zero3.md``); forward + backward, no update,
so both see the same weights. Counts come from ``torch._dynamo.utils.counters``.

``--deepspeed``: the tiny test recipe on 2 ranks (``deepspeed`` launcher, gloo) with
``model.compile`` false and true per JSON (the ZeRO-3 check of ``validate`` is lifted for the
measurement with ``BEIT3_ALLOW_COMPILE_ZERO3=1``): wall time, graph breaks and recompiles from
``TORCH_LOGS=graph_breaks,recompiles`` (rank 0), and the logged losses against eager.

``--engine-compile JSON``: DeepSpeed's own compile path on one in-process rank: the engine eager,
``engine.compile()`` (the whole module under ``torch.compile``, DeepSpeed's hooks as they are), and
``engine.compile()`` with ``"compile": {"deepcompile": true}`` in the JSON (DeepCompile's graph passes in
place of the hooks); full optimizer steps; wall time, graph breaks, graphs, losses against eager, or
why the variant did not run.
"""
from __future__ import annotations

import argparse
import time

import torch

from beit3.model import BEiT3ForPretraining, get_config
from beit3.pretrain.objective import mdm_loss
from beit3.testing.batches import random_micro_batch


def micro_batch(cfg, step: int, B: int = 4) -> dict:
    """Step ``step``'s sources: padded length 8..16, text lengths 3..L (row 0 full)."""
    return random_micro_batch(cfg, B=B, L=8 + step % 9, seed=step)


def tiny() -> BEiT3ForPretraining:
    """The measured model: tiny, seed 0, training mode."""
    torch.manual_seed(0)
    return BEiT3ForPretraining(get_config("tiny", vocab_size=300, num_visual_tokens=64)).train()


def max_rel(ref: list[float], got: list[float]) -> float:
    """The largest relative difference of ``got`` from ``ref``, element by element."""
    return max(abs(a - b) / abs(a) for a, b in zip(ref, got))


def run(model: BEiT3ForPretraining, steps: int) -> tuple[list[float], list[float], list[float]]:
    losses, norms, seconds = [], [], []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = mdm_loss(model, micro_batch(model.config, step), None, torch.device("cpu")).loss
        loss.backward()
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                           if p.grad is not None])).item())
    return losses, norms, seconds


def measure(steps: int, dynamic: str) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    eager = run(tiny(), steps)
    torch._dynamo.reset()
    counters.clear()
    model = tiny()
    model.beit3.compile_blocks(**({"dynamic": True} if dynamic == "true" else {}))
    compiled = run(model, steps)
    rel, rel_norm = max_rel(eager[0], compiled[0]), max_rel(eager[1], compiled[1])
    breaks = sum(counters["graph_break"].values())
    return {"steps": steps, "dynamic": dynamic, "graph_breaks": breaks, "break_reasons": dict(counters["graph_break"]),
            "frames_compiled": counters["frames"]["ok"], "unique_graphs": counters["stats"]["unique_graphs"],
            "recompiles": counters["frames"]["ok"] - 1, "max_rel_loss": rel, "max_rel_grad_norm": rel_norm,
            "eager_s": sum(eager[2]), "compiled_s": sum(compiled[2]), "first_compiled_step_s": compiled[2][0],
            "compiled_steady_s": sorted(compiled[2])[len(compiled[2]) // 2],
            "eager_steady_s": sorted(eager[2])[len(eager[2]) // 2], "compiled_step_s": compiled[2]}


def launched(ds_configs: list[str], steps: int) -> list[dict]:
    """2-rank runs with and without ``model.compile`` per DeepSpeed JSON."""
    import re
    import tempfile
    from pathlib import Path

    from beit3.demo.data import build_demo_data
    from beit3.testing.jobs import TEST_DATA_ARGS, launch, metrics, overrides
    from beit3.testing.tokenizers import make_tokenizer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = build_demo_data(work / "data", **TEST_DATA_ARGS)
        tok = make_tokenizer(work / "vqkd_tiny.pt", data.image_shards, data.spm_path)
        for ds in ds_configs:
            losses = {}
            for comp in ("false", "true"):
                out_dir = work / f"{Path(ds).stem}-{comp}"
                t0 = time.time()
                out = launch(2, overrides(data, tok, out_dir, **{"run.max_steps": steps, "run.save_every": 1000,
                                                                "data.num_workers": 0, "model.compile": comp}),
                             ds_config=ds, timeout=1200,
                             env={"TORCH_LOGS": "graph_breaks,recompiles", "BEIT3_ALLOW_COMPILE_ZERO3": "1"})
                wall = time.time() - t0
                losses[comp] = [metrics(out_dir)[s]["loss"] for s in range(1, steps + 1)]
                rank0 = [ln for ln in out.splitlines() if ln.startswith("[rank0]")]
                breaks = sum(1 for ln in rank0 if re.search(r"\] Graph break", ln))
                recompiles = sum(1 for ln in rank0 if "Recompiling function" in ln)
                where = sorted({m.group(1).split("site-packages/")[-1] for ln in rank0
                                if (m := re.search(r"Graph break .*?in user code at (\S+)", ln))})
                rows.append({"ds": ds, "compile": comp, "wall_s": wall, "graph_breaks": breaks,
                             "recompiles": recompiles, "break_sites": where})
            rel = max_rel(losses["false"], losses["true"])
            rows[-1]["max_rel_loss"] = rel
    return rows


def engine_rows(ds_name: str, steps: int) -> list[dict]:
    """Eager, ``engine.compile()`` and DeepCompile on a 1-rank engine over ``steps`` varied packed steps."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from beit3.runtime.engine import build_engine, engine_dtype, ensure_process_group_env, fill_batch_fields, load_ds_config
    from beit3.runtime.optim import OptimConfig, param_groups

    ensure_process_group_env()
    rows, eager = [], None
    for variant in ("eager", "engine.compile()", "engine.compile() + deepcompile"):
        ds = fill_batch_fields(load_ds_config(ds_name), 4, 1)
        ds["gradient_accumulation_steps"] = 1
        if variant.endswith("deepcompile"):
            ds["compile"] = {"deepcompile": True}
        torch._dynamo.reset()
        counters.clear()
        model = tiny()
        optim = OptimConfig()
        row: dict = {"variant": variant}
        t0 = time.perf_counter()
        try:
            engine, _, _ = build_engine(model, ds, param_groups(model, optim.weight_decay, optim.lr), optim)
            if variant != "eager":
                engine.compile()
            losses = []
            for step in range(steps):
                loss = mdm_loss(engine, micro_batch(model.config, step), None, engine.device, engine_dtype(engine)).loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
        except Exception as e:  # the variant's outcome is the row: why it cannot run here
            lines = str(e).splitlines()
            fatal = [ln.split("error:", 1)[1].strip() for ln in lines if "fatal error:" in ln][:1]
            row["error"] = f"{type(e).__name__}: {lines[0][:70]}" + (f" ({fatal[0]})" if fatal else "")
            rows.append(row)
            continue
        eager = eager or losses
        row.update(wall_s=time.perf_counter() - t0, graph_breaks=sum(counters["graph_break"].values()),
                   graphs=counters["stats"]["unique_graphs"],
                   max_rel_loss=max_rel(eager, losses),
                   break_reasons=sorted({k.splitlines()[0][:90] for k in counters["graph_break"]})[:4])
        rows.append(row)
    return rows


def print_engine_rows(ds_name: str, steps: int, rows: list[dict]) -> None:
    print(f"DeepSpeed's compile path, {ds_name}, 1 rank, {steps} optimizer steps of varying packed lengths (tiny, CPU)\n")
    print("| variant | wall (s) | graph breaks | graphs | max rel. loss vs eager | first break reasons / outcome |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | - | - | - | - | did not run: {r['error']} |")
            continue
        print(f"| {r['variant']} | {r['wall_s']:.1f} | {r['graph_breaks']} | {r['graphs']} | {r['max_rel_loss']:.1e} "
              f"| {'; '.join(r['break_reasons']) or '-'} |")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dynamic", choices=("auto", "true"), default="auto",
                    help="auto: torch's default (static first, dynamic after a size change); true: dynamic from the start")
    ap.add_argument("--deepspeed", nargs="+", metavar="JSON", help="2-rank launches per DeepSpeed JSON instead")
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--engine-compile", metavar="JSON", help="DeepSpeed's compile path on 1 rank instead")
    args = ap.parse_args(argv)
    if args.engine_compile:
        torch.set_num_threads(1)
        rows = engine_rows(args.engine_compile, args.train_steps)
        print_engine_rows(args.engine_compile, args.train_steps, rows)
        return {"rows": rows}
    if args.deepspeed:
        rows = launched(args.deepspeed, args.train_steps)
        print(f"model.compile in 2-rank pretraining runs ({args.train_steps} steps, tiny, CPU, gloo; rank 0's logs)\n")
        print("| DeepSpeed JSON | model.compile | wall (s) | graph breaks | recompiles | max rel. loss vs eager | break sites |")
        print("|---|---|---:|---:|---:|---:|---|")
        for r in rows:
            rel = f"{r['max_rel_loss']:.1e}" if "max_rel_loss" in r else "-"
            print(f"| {r['ds']} | {r['compile']} | {r['wall_s']:.1f} | {r['graph_breaks']} | {r['recompiles']} | {rel} | "
                  f"{', '.join(f'`{w}`' for w in r['break_sites'][:4]) or '-'} |")
        return {"rows": rows}
    torch.set_num_threads(1)
    r = measure(args.steps, args.dynamic)
    print(f"model.compile over {r['steps']} steps of varying packed lengths (tiny, CPU, dynamic={r['dynamic']})\n")
    print("| graph breaks | frames compiled | recompiles | max rel. loss diff | max rel. grad-norm diff | "
          "first compiled step (s) | compiled median step (s) | eager median step (s) | median ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {r['graph_breaks']} | {r['frames_compiled']} | {r['recompiles']} | {r['max_rel_loss']:.1e} | "
          f"{r['max_rel_grad_norm']:.1e} | {r['first_compiled_step_s']:.1f} | {r['compiled_steady_s']:.3f} | "
          f"{r['eager_steady_s']:.3f} | {r['compiled_steady_s'] / r['eager_steady_s']:.2f} |")
    slow = [(i + 1, round(t, 1)) for i, t in enumerate(r["compiled_step_s"]) if t > 20 * r["eager_steady_s"]]
    print(f"\ncompiled steps slower than 20x the eager median (step, s): {slow}")
    if r["break_reasons"]:
        print("\ngraph breaks:", r["break_reasons"])
    return r


if __name__ == "__main__":
    main()
