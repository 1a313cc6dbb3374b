"""Test tiers: unit tests (default), ``distributed`` (multi-process DeepSpeed on CPU/gloo),
``gpu`` (skipped without CUDA)."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: multi-process DeepSpeed/gloo test (CPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: longer CPU test")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
