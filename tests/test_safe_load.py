"""Files that may come from outside load weights-only: a pickle whose unpickling would run code
(here: create a file on disk) is refused with a clear error and nothing of it runs."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from beit3.model.safe_load import UnsafeFileError, load_untrusted


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appears if the pickle is executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def _malicious(tmp_path, name: str, wrap=lambda payload: payload):
    target = tmp_path / f"{name}.pwned"
    path = tmp_path / name
    torch.save(wrap({"model": {"w": torch.zeros(2)}, "hook": _CreatesFile(str(target))}), path)
    return path, target


def test_payload_really_runs_code_when_unpickled(tmp_path):
    """The test file is truly malicious: a plain (unsafe) load creates the file."""
    path, target = _malicious(tmp_path, "probe.pt")
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                   check=True, capture_output=True)
    assert target.exists()


@pytest.mark.parametrize("loader", ["load_untrusted", "tokenizer", "official", "finetune"])
def test_malicious_pickle_refused(tmp_path, loader):
    path, target = _malicious(tmp_path, f"{loader}.pt")
    if loader == "load_untrusted":  # teachers (pretrain/train_vqkd.py) load through it
        call = lambda: load_untrusted(path)  # noqa: E731
    elif loader == "tokenizer":
        from beit3.model.vqkd import load_tokenizer

        call = lambda: load_tokenizer(str(path))  # noqa: E731
    elif loader == "official":
        from beit3.model.convert import read_checkpoint

        call = lambda: read_checkpoint(path)  # noqa: E731
    else:
        from beit3.finetune.train import load_weights
        from beit3.model import get_config

        cfg = get_config("tiny")
        call = lambda: load_weights(torch.nn.Linear(2, 2), str(path), cfg)  # noqa: E731
    with pytest.raises(UnsafeFileError, match=r"refused to load .*the global .io\.open., which could run code"):
        call()
    assert not target.exists()


def test_own_tokenizer_format_is_weights_only_safe(tmp_path):
    from beit3.model.vqkd import VQKD, get_vqkd_config, load_tokenizer, save_tokenizer

    model = VQKD(get_vqkd_config("tiny"))
    model.quantize.embedding.initted.fill_(1)
    save_tokenizer(model, str(tmp_path / "tok.pt"))
    blob = torch.load(tmp_path / "tok.pt", weights_only=True)  # plain str/dict/tensors only
    assert blob["format"] == "beit3-vqkd" and isinstance(blob["config"], dict)
    again = load_tokenizer(str(tmp_path / "tok.pt"))
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
