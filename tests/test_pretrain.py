"""Pretraining: start-up validation (unit tier) and real DeepSpeed runs on CPU ranks (distributed tier)."""
import json
import os
import time
from pathlib import Path

import pytest
import torch

from beit3.data_pipeline import BatchArithmeticError, DataConfigError
from beit3.model.config import ConfigError
from beit3.pretrain import train
from beit3.testing.jobs import (REFERENCE_STEPS, REPO, TINY_YAML, Job, launch, launch_cmd, metrics, overrides, reserve_port,
                                run_env, start)


def _validate(demo_data, tiny_tokenizer, tmp_path, *extra, world_size=2):
    os.environ["WORLD_SIZE"] = str(world_size)
    try:
        return train.main(["--config", str(TINY_YAML), "--validate-only",
                           *overrides(demo_data, tiny_tokenizer, tmp_path), *extra])
    finally:
        os.environ.pop("WORLD_SIZE")


def test_valid_config_passes_validation(demo_data, tiny_tokenizer, tmp_path):
    assert _validate(demo_data, tiny_tokenizer, tmp_path) == {}


def test_batch_that_does_not_divide_fails_naming_fields(demo_data, tiny_tokenizer, tmp_path):
    with pytest.raises(BatchArithmeticError, match=r"data\.images=15.*set it to 14 or 16"):
        _validate(demo_data, tiny_tokenizer, tmp_path, "data.images=15")


def test_missing_shards_fail_at_start_up(demo_data, tiny_tokenizer, tmp_path):
    with pytest.raises(DataConfigError, match="image_shards"):
        _validate(demo_data, tiny_tokenizer, tmp_path, f"data.image_shards={tmp_path}/nothing-*.tar")


@pytest.mark.parametrize("extra,field", [
    (["optim.warmup_stepz=3"], "warmup_stepz"),
    (["model.overrides.num_visual_tokens=64"], "num_visual_tokens"),
    (["model.overrides.img_size=64"], "img_size"),
    (["targets.tokenizer_path=/nonexistent.pt"], "tokenizer_path"),
    (["model.overrides.vocab_size=100"], "vocab_size"),
    (["run.stage=text"], "run.stage"),
])
def test_wrong_config_fails_before_any_work(demo_data, tiny_tokenizer, tmp_path, extra, field):
    with pytest.raises(ConfigError, match=field):
        _validate(demo_data, tiny_tokenizer, tmp_path, *extra)


@pytest.mark.parametrize("name", ["base", "giant"])
def test_shipped_recipe_configs_load_and_name_missing_inputs(name):
    """The paper-recipe YAMLs parse into the typed config; without real shards start-up fails naming the field."""
    from beit3.model.config_io import load_config

    cfg = load_config(train.TrainConfig, REPO / "pretrain" / "configs" / f"{name}.yaml")
    assert (cfg.data.images, cfg.data.texts, cfg.data.pairs) == (2048, 2048, 2048)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.total_steps, cfg.optim.weight_decay) == (1e-3, 10000, 10**6, 0.05)
    assert cfg.model.build_config().drop_path_rate == 0.1 and cfg.model.grad_checkpointing
    with pytest.raises(ConfigError, match=r"data\.image_shards"):
        train.main(["--config", str(REPO / "pretrain" / "configs" / f"{name}.yaml"), "--validate-only"])


# ---- distributed tier: real `deepspeed` launches of 2 CPU ranks (gloo) --------------------------------
STEPS = 8


@pytest.mark.distributed
def test_loss_decreases_and_logs_every_part(reference_run):
    rows = metrics(reference_run)
    assert sorted(rows) == list(range(1, REFERENCE_STEPS + 1))
    first, last = rows[1], rows[REFERENCE_STEPS]
    assert last["loss"] < first["loss"] - 0.3, (first["loss"], last["loss"])
    for key in ("image/mim_loss", "image/mim_acc", "text/mlm_loss", "pair/mim_loss", "pair/mlm_acc", "lr",
                "grad_norm", "samples_per_s", "tflops", "mem_gb"):
        assert key in last, key
    ckpts = reference_run / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step_{REFERENCE_STEPS:08d}"
    assert sorted(p.name for p in ckpts.glob("step_*")) == [f"step_{s:08d}" for s in (4, 8, REFERENCE_STEPS)]


@pytest.mark.distributed
def test_kill_9_and_resume_reproduces_the_uninterrupted_curve(demo_data, tiny_tokenizer, reference_run, tmp_path):
    args = overrides(demo_data, tiny_tokenizer, tmp_path, **{"run.max_steps": STEPS, "run.save_every": 4,
                                                              "optim.warmup_steps": 2})
    with reserve_port() as port:
        job = start(launch_cmd(2, port, args, launcher="torchrun"), run_env())  # the whole job is killed: any launcher
        deadline = time.time() + 600
        try:
            while time.time() < deadline:  # kill -9 the whole job once step 6 is logged (checkpoint 4 complete)
                path = tmp_path / "metrics.jsonl"
                if path.exists() and max(metrics(tmp_path), default=0) >= 6:
                    break
                assert job.poll() is None, "training ended before it could be killed:\n" + job.output()[-4000:]
                time.sleep(0.2)
            else:
                job.wait(timeout=0.1)  # still running at the deadline: fail with every process's stacks
            job.kill()  # SIGKILL to the whole group
        finally:
            job.kill()
    assert max(metrics(tmp_path)) < STEPS
    launch(2, args)  # run.resume=auto
    ref, resumed = metrics(reference_run), metrics(tmp_path)
    for step in range(5, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4, abs=1e-4), step


@pytest.mark.distributed
def test_resume_on_one_rank_from_two(demo_data, tiny_tokenizer, reference_run, tmp_path):
    import shutil

    shutil.copytree(reference_run / "checkpoints", tmp_path / "checkpoints")
    for tag in ("step_00000008", f"step_{REFERENCE_STEPS:08d}"):  # resume from step 4, saved by 2 ranks
        shutil.rmtree(tmp_path / "checkpoints" / tag)
    out = launch(1, overrides(demo_data, tiny_tokenizer, tmp_path, **{"run.max_steps": 6, "run.save_every": 4,
                                                                      "optim.warmup_steps": 2}))
    assert "universal" in out
    ref, resumed = metrics(reference_run), metrics(tmp_path)
    assert sorted(resumed) == [5, 6]
    for step in (5, 6):  # same global batch, same weights: the same curve up to reduction order / bf16
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], rel=2e-2), step


@pytest.mark.distributed
def test_save_every_auto_measures_the_first_save_and_keeps_the_interval_on_resume(demo_data, tiny_tokenizer, tmp_path):
    """``run.save_every: auto``: the first save after ``save_auto_first`` steps is timed; with a
    tiny MTBF Young/Daly gives 1 step (a save after every step), and the resumed run keeps that
    interval from its checkpoint instead of measuring again."""
    args = {"run.save_every": "auto", "run.save_auto_first": 2, "run.mtbf_hours": 1e-9, "run.keep_last": 10,
            "optim.warmup_steps": 2}
    out = launch(2, overrides(demo_data, tiny_tokenizer, tmp_path, **{**args, "run.max_steps": 4}))
    assert out.count("save_every=auto: 1 steps") == 1, out[-4000:]  # logged once (rank 0), at step 2
    tags = lambda: sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))  # noqa: E731
    assert tags() == ["step_00000002", "step_00000003", "step_00000004"]
    out = launch(2, overrides(demo_data, tiny_tokenizer, tmp_path, **{**args, "run.max_steps": 6,
                                                                      "run.mtbf_hours": 1e9}))
    assert "save_every=auto:" not in out and "resumed at step 4" in out
    assert tags()[-2:] == ["step_00000005", "step_00000006"]  # the 1-step interval of the checkpoint
    with pytest.raises(ConfigError, match="run.save_every"):
        _validate(demo_data, tiny_tokenizer, tmp_path, "run.save_every=often")


@pytest.mark.distributed
def test_export_equals_gathered_weights_and_loads_in_official_layout(reference_run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from beit3.model import BEiT3
    from beit3.model.convert import backbone_state, official_to_ours
    from beit3.pretrain.export import main as export_main
    from beit3.testing.official_reference import build_official

    paths = export_main([str(reference_run / "checkpoints"), "--out", str(tmp_path), "--official"])
    ours = load_file(paths["weights"])
    tag = f"step_{REFERENCE_STEPS:08d}"
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(reference_run / "checkpoints"), tag=tag)
    assert ours.keys() == gathered.keys()
    for k in ours:
        assert torch.equal(ours[k], gathered[k]), k
    import json

    from beit3.model import BEiT3Config

    cfg = BEiT3Config.from_dict(json.loads(Path(paths["config"]).read_text())["model"])
    official_sd = torch.load(paths["official"], weights_only=True)["model"]
    official = build_official(cfg).eval()
    official.load_state_dict({k[len("beit3."):]: v for k, v in official_sd.items() if k.startswith("beit3.")})
    model = BEiT3(cfg).eval()
    model.load_state_dict(backbone_state(official_to_ours(official_sd, cfg)))
    images = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    text = torch.randint(4, 300, (2, 7))
    with torch.no_grad():
        a = official(visual_tokens=images, textual_tokens=text)["encoder_out"]
        b = model(images=images, text_ids=text).hidden
    assert (a - b).abs().max() < 1e-5
    assert torch.equal(official_sd["mim_head.weight"], ours["mim_head.weight"])


@pytest.mark.distributed
def test_two_node_launch_on_loopback(demo_data, tiny_tokenizer, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    args = overrides(demo_data, tiny_tokenizer, tmp_path / "run", **{"run.max_steps": 2})
    jobs = []
    with reserve_port() as port:
        try:
            for node_rank in (0, 1):
                cmd = launch_cmd(1, port, args)
                cmd[1:5] = ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank),
                            "--master_addr", "127.0.0.1", "--master_port", str(port)]
                jobs.append(Job(cmd, run_env()))
            deadline = time.time() + 600  # one deadline for both nodes; past it, both nodes' stacks
            results = [job.wait(timeout=max(1.0, deadline - time.time())) for job in jobs]
        finally:
            for job in jobs:
                job.kill()
    outs = [out for _, out in results]
    for (rc, out) in results:
        assert rc == 0, out[-4000:]
    rows = metrics(tmp_path / "run")
    assert sorted(rows) == [1, 2]
    assert "rank 0 of world size 2" in outs[0]  # rank 0 (node 0) logs; both nodes' ranks saved their shards
    tag = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    assert {p.name.split("_mp_rank")[0] for p in tag.glob("zero_pp_rank_*_model_states.pt")} == {
        "zero_pp_rank_0", "zero_pp_rank_1"}


@pytest.mark.distributed
def test_async_save_same_curve_and_a_truncated_rank1_shard_falls_back(demo_data, tiny_tokenizer, reference_run,
                                                                       tmp_path):
    """Background saves do not change training; every rank's files are in the marker; a
    truncated shard of rank 1 makes resume=auto warn naming it and continue from the previous
    complete tag, reproducing the uninterrupted curve."""
    args = overrides(demo_data, tiny_tokenizer, tmp_path, **{"run.max_steps": STEPS, "run.save_every": 4,
                                                              "optim.warmup_steps": 2, "run.async_save": "true"})
    launch(2, args)
    ref, run = metrics(reference_run), metrics(tmp_path)
    for step in range(1, STEPS + 1):
        assert run[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4, abs=1e-4), step
    ckpts = tmp_path / "checkpoints"
    marker = json.loads((ckpts / f"step_{STEPS:08d}" / "COMPLETE").read_text())
    assert {e["rank"] for e in marker["files"].values()} == {0, 1}
    victim = next(n for n, e in marker["files"].items() if e["rank"] == 1 and "optim_states" in n)
    with open(ckpts / f"step_{STEPS:08d}" / victim, "r+b") as f:
        f.truncate(marker["files"][victim]["size"] - 1000)
    (tmp_path / "metrics.jsonl").unlink()
    out = launch(2, args)
    assert "is damaged, falling back" in out and victim in out and "resumed at step 4" in out
    resumed = metrics(tmp_path)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    for step in resumed:
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4, abs=1e-4), step


@pytest.mark.distributed
def test_run_reads_its_shards_from_loopback_s3_as_from_disk(demo_data, tiny_tokenizer, reference_run, tmp_path):
    """The reference run's first steps with every manifest and shard in an S3 store (moto on
    loopback, found through AWS_ENDPOINT_URL like MinIO): the same losses as from local files."""
    import dataclasses

    from beit3.testing.loopback import S3ShardServer

    with S3ShardServer() as s3:
        base = s3.upload(Path(demo_data.root) / "shards", "demo", "shards/")
        remote = dataclasses.replace(demo_data, **{f"{src}_shards": f"{base}/{src}s/manifest.json"
                                                   for src in ("image", "text", "pair")})
        launch(2, overrides(remote, tiny_tokenizer, tmp_path, **{"run.max_steps": 3, "run.save_every": 4,
                                                                 "optim.warmup_steps": 2,
                                                                 "data.cache_dir": str(tmp_path / "cache")}))
    ref, got = metrics(reference_run), metrics(tmp_path)
    assert sorted(got) == [1, 2, 3]
    for step in (1, 2, 3):
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4, abs=1e-4), step
    cache = got[3]["remote_cache"]
    assert cache.get("fetch", 0) + cache.get("prefetch", 0) > 0 and "failed" not in cache, cache
    assert got[3]["skipped"] == ref[3]["skipped"]
