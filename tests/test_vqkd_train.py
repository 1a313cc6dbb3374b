"""Short VQ-KD training runs on real images (scikit-learn digits, upsampled to 32 px RGB) with a
small randomly initialised CLIP-layout teacher and a real DeepSpeed engine (1 CPU rank)."""
from __future__ import annotations

import pytest
import torch

from beit3.data_pipeline import write_images
from beit3.demo.digits import write_digits_image_folder
from beit3.model.config import ConfigError
from beit3.model.vqkd import ClipVisionTeacher, load_tokenizer
from beit3.pretrain import train_vqkd
from beit3.model.config_io import load_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqkd_train")
    write_digits_image_folder(root / "digits", size=32, limit=960)
    write_images.main([str(root / "digits"), str(root / "shards"), "-q", "--maxcount", "600"])
    torch.manual_seed(0)
    torch.save(ClipVisionTeacher(32, 8, 64, 2, 1, 64).state_dict(), root / "teacher.pt")
    return root


def _args(root, out, steps: int, *extra: str) -> list[str]:
    return ["preset=tiny", f"teacher.path={root / 'teacher.pt'}",
            f"data.image_shards=[{root / 'shards' / 'manifest.json'}]", "data.img_size=32", "data.patch_size=8",
            "data.num_workers=0", f"run.output_dir={out}", "run.batch_size=32",
            "run.deepspeed_config=zero1_fp32.json", f"optim.total_steps={steps}", "optim.warmup_steps=3",
            "optim.lr=1e-3", "run.log_every=5", "run.save_every=100", "codebook.usage_window=5",
            "codebook.dead_after_steps=5", *extra]


def _run(argv: list[str]) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = load_config(train_vqkd.TrainVQKDConfig, None, argv)
        return train_vqkd.train(cfg)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_training_raises_usage_and_cosine_and_codebook_reseeding_helps(setup, tmp_path):
    root = setup
    reseeded = _run(_args(root, tmp_path / "reseed", 40))
    h = reseeded["history"]
    first, last = h[0], h[-1]
    assert reseeded["step"] == 40 and [m["step"] for m in h] == list(range(5, 45, 5))
    assert last["rec_cos"] > first["rec_cos"] + 0.15  # reconstruction of the teacher's features
    assert last["perplexity"] > 1.3 * first["perplexity"]  # codebook usage spreads out
    assert last["codes_used"] > 0.85 * 128
    tok = load_tokenizer(str(tmp_path / "reseed" / "tokenizer.pt"))  # the exported tokenizer
    assert tok.codes(torch.rand(2, 3, 32, 32)).shape == (2, 16)

    # no re-seeding: random codebook init, no re-seeding -> far fewer live codes
    plain = _run(_args(root, tmp_path / "plain", 40, "model.kmeans_init=false", "codebook.reseed_dead=false"))
    p_last = plain["history"][-1]
    assert last["codes_used"] > 1.5 * p_last["codes_used"]
    assert last["perplexity"] > 1.5 * p_last["perplexity"]


def test_config_errors_name_the_field(setup, tmp_path):
    root = setup
    with pytest.raises(ConfigError, match="data.img_size"):
        load_config(train_vqkd.TrainVQKDConfig, None, _args(root, tmp_path, 5) + ["data.img_size=64"])
    with pytest.raises(ConfigError, match="teacher.kind"):
        load_config(train_vqkd.TrainVQKDConfig, None, _args(root, tmp_path, 5) + ["teacher.kind=vgg"])
    with pytest.raises(ConfigError, match="codebook.bogus"):
        load_config(train_vqkd.TrainVQKDConfig, None, _args(root, tmp_path, 5) + ["codebook.bogus=1"])
    with pytest.raises(ConfigError, match="teacher_dim"):
        _run(_args(root, tmp_path, 5, "model.teacher_dim=32"))
