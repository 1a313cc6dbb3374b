"""Multi-process VQ-KD tests (2 CPU ranks, gloo): distributed EMA/k-means equals the single
process on the same data; 2-rank DeepSpeed training saves, resumes and exports."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from beit3.model.vqkd import NormEMAQuantizer
from beit3.runtime.engine import free_port

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
    import os, sys, torch, torch.distributed as dist
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
    dist.destroy_process_group()
""")


def test_distributed_ema_equals_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                    f"--master_port={free_port()}", str(script), str(tmp_path)],
                   check=True, env=env, timeout=240, capture_output=True)
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
    from beit3.data_pipeline.demo_data import write_digits_image_folder
    from beit3.model.vqkd import ClipVisionTeacher, load_tokenizer

    write_digits_image_folder(tmp_path / "digits", size=32, limit=256)
    write_images.main([str(tmp_path / "digits"), str(tmp_path / "shards"), "-q", "--maxcount", "100"])
    torch.manual_seed(0)
    torch.save(ClipVisionTeacher(32, 8, 64, 2, 1, 64).state_dict(), tmp_path / "teacher.pt")
    out = tmp_path / "run"

    def launch(steps: int, use_deepspeed_launcher: bool) -> dict:
        metrics = tmp_path / f"metrics{steps}.json"
        if use_deepspeed_launcher:  # the documented command
            start = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module"]
        else:  # torchrun: lighter (no launcher process importing DeepSpeed)
            start = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                     f"--master_port={free_port()}", "-m"]
        cmd = [*start, "beit3.pretrain.train_tokenizer", "--metrics-out", str(metrics),
               "preset=tiny", f"teacher.path={tmp_path / 'teacher.pt'}",
               f"data.image_shards=[{tmp_path / 'shards' / 'manifest.json'}]", "data.img_size=32",
               "data.patch_size=8", "data.num_workers=0", f"run.out_dir={out}", "run.batch_size=8",
               "run.deepspeed_config=vqkd_zero1_fp32.json", f"optim.total_steps={steps}", "optim.warmup_steps=1",
               "run.log_every=2", "run.save_every=2", "run.keep_last=2"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, timeout=300, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
