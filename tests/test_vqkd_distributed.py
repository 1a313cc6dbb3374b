"""Multi-process VQ-KD tests (2 CPU ranks, gloo): distributed EMA/k-means equals the single
process on the same data; 2-rank DeepSpeed training saves, resumes and exports."""
from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap

import pytest
import torch

from beit3.model.vqkd import NormEMAQuantizer

pytestmark = pytest.mark.distributed

STEPS, BATCH, N, D, K = 3, 4, 16, 16, 32


def _data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(2 * BATCH, N, D, generator=g) for _ in range(STEPS)]


def _run_quantizer(q: NormEMAQuantizer, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    codes = []
    for z in batches:
        codes.append(q(z).codes)
    return codes


WORKER = textwrap.dedent(f"""
    import faulthandler, os, signal, sys, torch, torch.distributed as dist
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # run_job's stack dump
    sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
    from test_vqkd_distributed import _data, _run_quantizer, BATCH, D, K
    from beit3.model.vqkd import NormEMAQuantizer
    dist.init_process_group("gloo")
    r = dist.get_rank()
    torch.set_num_threads(1)
    q = NormEMAQuantizer(K, D, decay=0.9, kmeans_init=True).train()
    codes = _run_quantizer(q, [z[r * BATCH:(r + 1) * BATCH] for z in _data()])
    torch.save({{"codebook": q.codebook, "cluster_size": q.cluster_size, "codes": codes}},
               os.path.join(sys.argv[1], f"rank{{r}}.pt"))
    dist.barrier()  # agreed shutdown: no rank tears gloo down while its peer is still in a collective
    dist.destroy_process_group()
""")


def test_distributed_ema_equals_single_process(tmp_path):
    from beit3.testing.jobs import run_env, run_job  # here: the workers import this module as a script

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    # --standalone: torchrun's own rendezvous store on a port it binds and keeps (nothing to steal)
    rc, out = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(script), str(tmp_path)], run_env(), timeout=240)
    assert rc == 0, out[-4000:]
    single = NormEMAQuantizer(K, D, decay=0.9, kmeans_init=True).train()
    ref_codes = _run_quantizer(single, _data())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, out in enumerate(ranks):
        torch.testing.assert_close(out["codebook"], single.codebook, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out["cluster_size"], single.cluster_size, atol=1e-5, rtol=1e-6)
        for step in range(STEPS):
            assert torch.equal(out["codes"][step], ref_codes[step][r * BATCH:(r + 1) * BATCH])
    assert float(single.cluster_size.sum()) > 0 and len(set(torch.cat(ref_codes).flatten().tolist())) > K // 2


def test_two_rank_training_resumes(tmp_path):
    if shutil.which("deepspeed") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "deepspeed")):
        pytest.skip("deepspeed launcher not found")
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    from beit3.data_pipeline import write_images
    from beit3.runtime.ports import reserve_port
    from beit3.testing.jobs import run_env, run_job
    from beit3.demo.digits import write_digits_image_folder
    from beit3.model.vqkd import ClipVisionTeacher, load_tokenizer

    write_digits_image_folder(tmp_path / "digits", size=32, limit=256)
    write_images.main([str(tmp_path / "digits"), str(tmp_path / "shards"), "-q", "--maxcount", "100"])
    torch.manual_seed(0)
    torch.save(ClipVisionTeacher(32, 8, 64, 2, 1, 64).state_dict(), tmp_path / "teacher.pt")
    out = tmp_path / "run"

    def launch(steps: int, use_deepspeed_launcher: bool) -> dict:
        metrics = tmp_path / f"metrics{steps}.json"
        if use_deepspeed_launcher:  # the documented command
            start = [launcher, "--num_gpus", "2", "--master_port", "{port}", "--module"]
        else:  # torchrun: lighter (no launcher process importing DeepSpeed); --standalone: its own store
            start = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
        cmd = [*start, "beit3.pretrain.train_vqkd", "--metrics-out", str(metrics),
               "preset=tiny", f"teacher.path={tmp_path / 'teacher.pt'}",
               f"data.image_shards=[{tmp_path / 'shards' / 'manifest.json'}]", "data.img_size=32",
               "data.patch_size=8", "data.num_workers=0", f"run.output_dir={out}", "run.batch_size=8",
               "run.deepspeed_config=zero1_fp32.json", f"optim.total_steps={steps}", "optim.warmup_steps=1",
               "run.log_every=2", "run.save_every=2", "run.keep_last=2"]
        with reserve_port() as port:  # held until the job ended
            rc, text = run_job([str(port) if a == "{port}" else a for a in cmd], run_env(), timeout=300)
        assert rc == 0, text[-6000:]
        return json.loads(metrics.read_text())

    first = launch(4, use_deepspeed_launcher=True)
    assert first["start_step"] == 0 and first["step"] == 4
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000002", "step_00000004"]
    assert json.loads((out / "checkpoints" / "step_00000004" / "COMPLETE").read_text())["world_size"] == 2
    second = launch(6, use_deepspeed_launcher=False)  # resumes from step 4 (model, optimizer, loader position, usage tracker)
    assert second["start_step"] == 4 and second["step"] == 6
    assert [m["step"] for m in second["history"]] == [6]
    tok = load_tokenizer(str(out / "tokenizer.pt"))
    assert tok.codes(torch.rand(2, 3, 32, 32)).shape == (2, 16)


def test_supervised_tokenizer_training_survives_nan_and_a_killed_rank(tmp_path):
    """The tokenizer trainer on the shared run-time: a NaN loss on rank 0 at step 3 is skipped on
    both ranks (counted), rank 1 killed at step 5 is relaunched by the supervisor from the step-4
    checkpoint, and the exported tokenizer equals that of a run with the NaN alone (no restart)."""
    from beit3.data_pipeline import write_images
    from beit3.demo.digits import write_digits_image_folder
    from beit3.model.vqkd import ClipVisionTeacher
    from beit3.runtime.faults import ENV, read_ledger
    from beit3.runtime.ports import reserve_port
    from beit3.testing.jobs import launcher_head, run_env, run_job

    write_digits_image_folder(tmp_path / "digits", size=32, limit=256)
    write_images.main([str(tmp_path / "digits"), str(tmp_path / "shards"), "-q", "--maxcount", "100"])
    torch.manual_seed(0)
    torch.save(ClipVisionTeacher(32, 8, 64, 2, 1, 64).state_dict(), tmp_path / "teacher.pt")

    def launch(out, faults: str, supervise: list[str] = ()) -> None:
        with reserve_port() as port:  # held across the supervisor's relaunches
            # the supervised run under DeepSpeed's launcher (the failed rank's exit code), the reference under torchrun
            if supervise:
                head = [*launcher_head(2, port, "deepspeed"), "--module"]
            else:
                head = [*launcher_head(2, port, "torchrun"), "-m"]
            cmd = [*head, "beit3.pretrain.train_vqkd", "preset=tiny", f"teacher.path={tmp_path / 'teacher.pt'}",
                   f"data.image_shards=[{tmp_path / 'shards' / 'manifest.json'}]", "data.img_size=32",
                   "data.patch_size=8", "data.num_workers=0", f"run.output_dir={out}", "run.batch_size=8",
                   "run.deepspeed_config=zero1_fp32.json", "optim.total_steps=8", "optim.warmup_steps=1",
                   "run.log_every=1", "run.save_every=2", "run.keep_last=2"]
            if supervise:
                cmd = [sys.executable, "-m", "beit3.runtime.supervise", *supervise, "--", *cmd]
            rc, text = run_job(cmd, {**run_env(), ENV: faults}, timeout=600)
        assert rc == 0, text[-6000:]

    launch(tmp_path / "ref", "nan:step=3:rank=0")
    summary = tmp_path / "summary.json"
    launch(tmp_path / "run", "nan:step=3:rank=0,exit:step=5:rank=1", ["--backoff", "0", "--summary", str(summary)])
    assert [a["exit_code"] for a in json.loads(summary.read_text())["attempts"]][-1] == 0
    assert len(json.loads(summary.read_text())["attempts"]) == 2
    assert [(r["kind"], r["step"]) for r in read_ledger(str(tmp_path / "run"))] == [("nan", 3), ("exit", 5)]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 8 and rows[-1]["skipped_steps"] == 1
    want = torch.load(tmp_path / "ref" / "tokenizer.pt", weights_only=False)
    got = torch.load(tmp_path / "run" / "tokenizer.pt", weights_only=False)
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
