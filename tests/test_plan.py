"""The run planner (pretrain/plan.py): model-state arithmetic against DeepSpeed's estimator,
meta-device activation bytes against a real CPU run, the giant sanity row, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from beit3.model.config_io import load_config
from beit3.pretrain import plan, plan_memory as pm
from beit3.pretrain.train import TrainConfig

REPO = plan.REPO
TINY = str(REPO / "pretrain" / "configs" / "tiny_demo.yaml")


def tiny_config():
    return load_config(TrainConfig, TINY, [])


def test_zero3_model_states_match_deepspeed_estimator():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = tiny_config().model.build_config()
    model = pm.build_model(cfg, "meta")
    n, largest = sum(p.numel() for p in model.parameters()), pm.largest_layer_numel(model)
    st = pm.model_state_bytes(n, 2, 3, bf16=True, grad_bytes=4)
    assert st == {"params": 2 * n / 2, "grads": 4 * n / 2, "optimizer": 12 * n / 2}  # numel arithmetic
    _, gpu, layer = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=2, cpu_offload=False)
    assert gpu - layer == sum(st.values())  # DeepSpeed: 4 * largest layer + 18 * N / ranks
    off = pm.model_state_bytes(n, 2, 3, bf16=True, grad_bytes=4, offload_optimizer=True)
    _, gpu, layer = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=2, cpu_offload=True,
                                                          cpu_offload_params=False)
    assert gpu - layer == sum(off.values())  # offloaded optimizer: 2 * N / ranks of 16-bit params stay
    z = pm.zero_setup(json.loads((REPO / "ds_configs" / "zero3_bf16.json").read_text()))
    assert (z.stage, z.bf16, z.grad_bytes, z.prefetch_bucket, z.reduce_bucket) == (3, True, 4, 50_000_000, 50_000_000)


def _uniform_init(tensor, std=1.0, a=-2.0, b=2.0, **_):
    """Stands in for ``nn.init.trunc_normal_`` where only shapes matter: torch's rejection sampler
    redraws the whole tensor until every element is inside the cut, ~15 passes at +-1 std, 20 s for
    base's 64k x 768 embeddings on one core."""
    with torch.no_grad():
        return tensor.uniform_(max(a, -std), min(b, std))


# base at its widths (768, 12 heads, 3072) with 3 of its 12 blocks: the prediction is per block times
# depth (the tiny cases have 2), and a CPU step of all 12 blocks costs ~10 s
@pytest.mark.parametrize("preset,micro,extra", [("tiny_demo", {"image": 2, "text": 2, "pair": 4}, []),
                                                ("tiny_demo", {"image": 4, "text": 4, "pair": 8}, []),
                                                ("base", {"image": 1, "text": 1, "pair": 1}, ["model.overrides.depth=3"])])
@pytest.mark.slow
def test_meta_activation_bytes_match_a_real_cpu_run(preset, micro, extra, monkeypatch):
    cfg = load_config(TrainConfig, str(REPO / "pretrain" / "configs" / f"{preset}.yaml"), extra)
    mc = cfg.model.build_config()
    predicted = pm.measure_activations(mc, cfg.data, micro, torch.float32)
    monkeypatch.setattr(torch.nn.init, "trunc_normal_", _uniform_init)  # activation bytes do not depend on values
    real = pm.build_model(mc, "cpu", torch.float32)
    plain = pm.run_step(real, pm.build_batch(mc, cfg.data, micro, "cpu"), False, "cpu", torch.float32)
    ckpt = pm.run_step(real, pm.build_batch(mc, cfg.data, micro, "cpu"), True, "cpu", torch.float32)
    assert all(p.grad is not None for p in real.parameters() if p.requires_grad)  # a real backward ran
    measured = {"no_ckpt": plain.saved, "ckpt": ckpt.saved, "max_block": plain.max_block,
                "peak_no_ckpt": plain.saved + plain.max_block, "peak_ckpt": ckpt.saved + plain.max_block}
    got = {"no_ckpt": predicted["no_ckpt"].saved, "ckpt": predicted["ckpt"].saved,
           "max_block": predicted["ckpt"].max_block, "peak_no_ckpt": predicted["no_ckpt"].peak,
           "peak_ckpt": predicted["ckpt"].peak}
    print("predicted", got, "measured", measured)
    for k in measured:
        assert abs(got[k] - measured[k]) <= 0.10 * measured[k], (k, got[k], measured[k])
    assert measured["ckpt"] < 0.5 * measured["no_ckpt"]
    assert predicted["no_ckpt"].flops == plain.flops


def test_activations_scale_with_micro_batch():
    cfg = tiny_config()
    mc = cfg.model.build_config()
    a = pm.measure_activations(mc, cfg.data, {"image": 2, "text": 2, "pair": 4}, torch.float32)["no_ckpt"].saved
    b = pm.measure_activations(mc, cfg.data, {"image": 4, "text": 4, "pair": 8}, torch.float32)["no_ckpt"].saved
    assert 1.8 < b / a < 2.05


def implied_mfu(days: float = 14.0) -> tuple[dict, float]:
    p = plan.plan(str(REPO / "pretrain" / "configs" / "giant.yaml"), "zero3_bf16.json", 256, "a100-40gb", mfu=1.0)
    return p, p["time"]["days"] / days  # days scale as 1 / MFU


@pytest.mark.slow
def test_giant_two_weeks_on_256_a100_implies_a_plausible_mfu():
    p, mfu = implied_mfu()
    cfg = load_config(TrainConfig, str(REPO / "pretrain" / "configs" / "giant.yaml"), [])
    again = plan.time_plan(cfg, p["memory"], 256, "a100-40gb", mfu)
    assert again["days"] == pytest.approx(14.0, rel=1e-9)
    # the arithmetic of bench/results/plan.md: step FLOPs x steps / (GPUs x peak x 14 days)
    assert mfu == pytest.approx(p["time"]["step_flops"] * 1e6 / (256 * 312e12 * 14 * 86400), rel=1e-9)
    assert p["memory"]["fits"]  # 8 images + 8 texts + 8 pairs per rank with checkpointing fit 40 GB
    assert 0.05 < mfu < 0.5, mfu  # 0.094: bench/results/plan.md (sanity row)
    assert 1.8e9 < p["memory"]["numel"] < 2.0e9  # the paper's 1.9B


def test_cli_prints_the_table_and_json(capsys):
    plan.main(["--config", TINY, "--deepspeed_config", "zero3_fp32.json", "--gpus", "1", "--gpu", "h100"])
    out = capsys.readouterr().out
    for item in ("peak per GPU", "FLOPs per optimizer step", "loader cores per GPU", "Young/Daly interval"):
        assert item in out
    plan.main(["--config", TINY, "--deepspeed_config", "zero3_fp32.json", "--gpus", "1", "--json"])
    p = json.loads(capsys.readouterr().out)
    assert p["memory"]["fits"] and p["time"]["mfu_source"] == "assumed"
    assert p["data"]["rates"]["image"] == 315.0


PARTITION_WORKER = '''
import json, sys, torch
from beit3.model.config_io import load_config
from beit3.pretrain.train import TrainConfig
from beit3.pretrain import plan_memory as pm
from beit3.runtime.engine import build_engine, fill_batch_fields, init_distributed, load_ds_config, shutdown_distributed
rank, world, _ = init_distributed(device="cpu")
torch.set_num_threads(1)
cfg = load_config(TrainConfig, sys.argv[1], [])
model = pm.build_model(cfg.model.build_config(), "cpu", torch.float32)
ds = fill_batch_fields(load_ds_config("zero3_bf16.json"), 2, world)
engine, _, _ = build_engine(model, ds, [{"params": list(model.parameters())}], cfg.optim)
opt = engine.optimizer
params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in engine.module.parameters())
master = sum(t.numel() * t.element_size() for t in opt.fp32_partitioned_groups_flat)
json.dump({"params": params, "master": master, "dtype": str(next(engine.module.parameters()).ds_tensor.dtype)},
          open(f"{sys.argv[2]}/rank{rank}.json", "w"))
shutdown_distributed()
'''


@pytest.mark.distributed
def test_zero3_model_states_equal_the_real_partitions_of_two_ranks(tmp_path):
    """The planner's ZeRO-3 parameter and fp32 master bytes per rank equal a real 2-rank engine's
    partitions (``ds_tensor`` and ``fp32_partitioned_groups_flat``), byte for byte."""
    import sys

    from beit3.testing.jobs import run_env, run_job

    script = tmp_path / "worker.py"
    script.write_text(PARTITION_WORKER)
    rc, out = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(script), TINY, str(tmp_path)], run_env(), timeout=300)
    assert rc == 0, out[-4000:]
    model = pm.build_model(tiny_config().model.build_config(), "meta")
    numels = [p.numel() for p in model.parameters()]
    st = pm.model_state_bytes(numels, 2, 3, bf16=True, grad_bytes=4)
    for rank in (0, 1):
        real = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert real["dtype"] == "torch.bfloat16"
        assert real["params"] == st["params"], (rank, real, st)  # 2 B x sum(ceil(n / 2))
        assert real["master"] == st["optimizer"] / 3  # the fp32 master: 4 of the 12 optimizer bytes


def test_feed_check_warns_when_the_workers_cannot_feed_a_rank_at_30_percent_mfu():
    """pretrain/feed.py: the base recipe at 30% MFU of an H200 (989 TFLOP/s) on 8 ranks needs
    ~5.7 loader cores per rank at the measured per-core rates; its 8 workers suffice, 4 do not;
    no peak (CPU without run.peak_tflops) means no check."""
    from beit3.pretrain.feed import feed_warning, loader_rates, need_per_rank, sample_flops, workers_needed

    cfg = load_config(TrainConfig, str(REPO / "pretrain" / "configs" / "base.yaml"), [])
    mc, data = cfg.model.build_config(), cfg.data
    need = need_per_rank(mc, data, 8, 989.0)
    flops = sample_flops(mc, data)
    step_s = 256 * sum(flops.values()) / (989e12 * 0.30)  # 2048 / 8 ranks of each source
    assert need == pytest.approx({s: 256 / step_s for s in ("image", "text", "pair")}, rel=1e-12)
    cores = workers_needed(need, loader_rates())
    assert 5.0 < cores < data.num_workers == 8
    assert feed_warning(mc, data, 8, 989.0) is None
    data.num_workers = 4
    line = feed_warning(mc, data, 8, 989.0)
    assert line.startswith("data.num_workers=4 is below the 6 loader workers per rank needed at 30% MFU of 989 TFLOP/s")
    assert feed_warning(mc, data, 8, None) is None
    assert workers_needed(need_per_rank(mc, data, 8, 989.0 / 2), loader_rates()) == pytest.approx(cores / 2)
