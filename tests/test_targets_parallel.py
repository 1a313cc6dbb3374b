"""``python -m beit3.pretrain.targets``: decode workers, ranks of a distributed job and resume all
write the same bytes as one process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from beit3.data_pipeline import write_images
from beit3.demo.digits import write_digits_image_folder
from beit3.pretrain import targets as targets_cli
from beit3.runtime.ports import reserve_port
from beit3.testing.jobs import launcher_head, run_env, run_job
from beit3.testing.tokenizers import random_codebook_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("targets_parallel")
    folder = write_digits_image_folder(root / "digits", size=40, limit=70)
    (folder / "four" / "broken.png").write_bytes(b"not a png")
    write_images.main([str(folder), str(root / "shards"), "-q", "--maxcount", "12", "--no-verify"])
    random_codebook_tokenizer(root / "tokenizer.pt")
    return root


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--tokenizer", str(root / "tokenizer.pt"), "--shards", str(root / "shards" / "manifest.json"),
            "--out", str(out), "--views", "2", "--batch-size", "8", "--seed", "3", "-q", *extra]


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".json")}


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_workers_and_resume_write_the_same_bytes(data, tmp_path, capsys):
    assert targets_cli.main(_args(data, tmp_path / "w1")) == 0
    one = _summary(capsys)
    assert one["samples"] == 71 and one["coded"] == 70 and one["corrupt_image"] == 1 and one["shards"] == 6
    assert targets_cli.main(_args(data, tmp_path / "w2", "--workers", "2")) == 0
    ref = _shards(tmp_path / "w1")
    assert len(ref) == 7 and _shards(tmp_path / "w2") == ref
    man = json.loads(ref["manifest.json"])
    assert man["total"] == 71 and man["meta"]["stats"] == {"coded": 70, "corrupt_image": 1}
    # an interrupted run: one shard lost, one half-written temporary file; the rerun codes only that one
    out = tmp_path / "w2"
    (out / "images-000002.tar").unlink()
    (out / "images-000002.tar.done").unlink()
    (out / "images-000004.tar.tmp").write_bytes(b"partial")
    assert targets_cli.main(_args(data, out, "--workers", "2")) == 0
    again = _summary(capsys)
    assert again["shards"] == 1 and again["resumed_shards"] == 5 and again["samples"] == 12
    assert _shards(out) == ref
    with pytest.raises(ValueError, match="coded with .* use another --out"):
        targets_cli.main(_args(data, out, "--views", "3"))
    # the codes' dtype and device are part of the options: shards coded on a GPU are not topped up on the CPU
    assert {k: man["meta"]["codes"][k] for k in ("dtype", "device")} == {"dtype": "float32", "device": "cpu"}
    marker = out / "images-000003.tar.done"
    done = json.loads(marker.read_text())
    marker.write_text(json.dumps({**done, "options": {**done["options"], "device": "cuda"}}))
    (out / "images-000002.tar").unlink()
    with pytest.raises(ValueError, match="'device': 'cuda'.* use another --out"):
        targets_cli.main(_args(data, out))


@pytest.mark.distributed
def test_two_rank_job_shares_the_shards_and_writes_one_manifest(data, tmp_path, capsys):
    assert targets_cli.main(_args(data, tmp_path / "single")) == 0
    out = tmp_path / "ranks"
    with reserve_port() as port:  # held until the job ended; run_job: bounded, stacks on a hang
        cmd = [*launcher_head(2, port, "torchrun"), "-m", "beit3.pretrain.targets", *_args(data, out, "--device", "cpu")]
        rc, text = run_job(cmd, {**run_env(), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert rc == 0, text[-6000:]
    summaries = [json.loads(line.split("] ", 1)[-1]) for line in text.splitlines()
                 if '"rank"' in line and line.split("] ", 1)[-1].lstrip().startswith("{")]
    assert sorted(s["rank"] for s in summaries) == [0, 1] and sum(s["shards"] for s in summaries) == 6
    assert sum("manifest" in s for s in summaries) == 1
    assert _shards(out) == _shards(tmp_path / "single")
