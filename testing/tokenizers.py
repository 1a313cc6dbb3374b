"""Small frozen VQ-KD tokenizers for tests and benches: deterministic visual targets without a
training run."""
from __future__ import annotations

from pathlib import Path

import torch


def make_tokenizer(path: Path, image_shards: str, spm_path: str) -> Path:
    """A frozen tiny VQ-KD whose codebook is k-means-initialized on real image features
    (random encoder): distinct, deterministic targets without a training run."""
    from beit3.data_pipeline import DataConfig, ImageLoader
    from beit3.model.vqkd import VQKD, get_vqkd_config, save_tokenizer

    torch.manual_seed(0)
    model = VQKD(get_vqkd_config("tiny"))
    cfg = DataConfig(image_shards=[image_shards], texts=0, pairs=0, img_size=32, patch_size=8, num_workers=0,
                     spm_path=spm_path)
    batch = next(iter(ImageLoader(cfg, batch_size=64)))
    with torch.no_grad():
        z = model.encode(batch["tokenizer_images"])
        model.quantize.init_codebook_(z.reshape(-1, z.shape[-1]))
    save_tokenizer(model, str(path))
    return path


def random_codebook_tokenizer(path: Path) -> Path:
    """A frozen tiny VQ-KD with a random unit-norm codebook marked initialized: deterministic
    codes without any data (seed 0), for tests and benches of code precompute."""
    import torch.nn.functional as F

    from beit3.model.vqkd import VQKD, get_vqkd_config, save_tokenizer

    torch.manual_seed(0)
    tok = VQKD(get_vqkd_config("tiny"))
    with torch.no_grad():
        tok.quantize.embedding.weight.copy_(F.normalize(torch.randn_like(tok.quantize.codebook), dim=-1))
        tok.quantize.embedding.initted.fill_(1.0)
    save_tokenizer(tok, str(path))
    return path
