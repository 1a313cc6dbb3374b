"""Test tiers: unit tests (default), ``distributed`` (multi-process DeepSpeed on CPU/gloo),
``gpu`` (skipped without CUDA).

The CPU tiers run on the CPU even on a GPU machine: ``BEIT3_DEVICE=cpu`` (``runtime.engine.
select_device``) and ``DS_ACCELERATOR=cpu`` (DeepSpeed's accelerator, read when deepspeed is first
imported) are set here, before any test module imports deepspeed, so every launched rank inherits
them; a test marked ``gpu`` gets ``BEIT3_DEVICE=cuda`` and DeepSpeed's own choice for its launches.
"""
import os

import pytest
import torch

_CPU_TIER_ENV = {"BEIT3_DEVICE": "cpu", "DS_ACCELERATOR": "cpu"}
_SET_HERE = {k: v for k, v in _CPU_TIER_ENV.items() if k not in os.environ}
os.environ.update(_SET_HERE)  # a value the caller exported wins


@pytest.fixture(autouse=True)
def _gpu_tests_leave_the_cpu_tier(request, monkeypatch):
    if "gpu" in request.keywords:
        if "BEIT3_DEVICE" in _SET_HERE:
            monkeypatch.setenv("BEIT3_DEVICE", "cuda")
        if "DS_ACCELERATOR" in _SET_HERE:
            monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "distributed: multi-process DeepSpeed/gloo test (CPU)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one")
    config.addinivalue_line("markers", "slow: longer CPU test")


def pytest_addoption(parser):
    parser.addoption("--record-module-seconds", metavar="PATH",
                     help=f"write each test module's seconds (setup + call + teardown) as JSON (e.g. {MODULE_SECONDS})")


def pytest_collection_modifyitems(config, items):
    _longest_modules_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- the order of test modules: longest first -----------------------------------------------------
# ``make test`` runs ``pytest -n 2 --dist loadfile --no-loadscope-reorder``: each worker takes the next
# whole module in collection order. Longest modules first (the measured seconds of
# tests/data/module_seconds.json) leaves the short unit-test modules to even out the two workers' ends,
# instead of xdist's default order (most tests first), which left the few-test launch modules to the end.
MODULE_SECONDS = os.path.join(os.path.dirname(__file__), "data", "module_seconds.json")


def _longest_modules_first(items) -> None:
    import json

    try:
        with open(MODULE_SECONDS) as fh:
            seconds = json.load(fh)
    except FileNotFoundError:
        seconds = {}
    guess: dict[str, float] = {}  # a module not measured yet: ~10 s per launching test
    for item in items:
        module = _module(item.nodeid)
        guess[module] = guess.get(module, 0.0) + (10.0 if "distributed" in item.keywords else 0.05)
    cost = {m: seconds.get(m, g) for m, g in guess.items()}
    items.sort(key=lambda item: -cost[_module(item.nodeid)])  # stable: a module's tests stay together, in order


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0]


_recorded: dict[str, float] = {}


def pytest_runtest_logreport(report):
    module = _module(report.nodeid)
    _recorded[module] = _recorded.get(module, 0.0) + report.duration


def pytest_sessionfinish(session):
    path = session.config.getoption("--record-module-seconds")
    if path and not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        import json

        with open(path, "w") as fh:
            json.dump({m: round(s, 1) for m, s in sorted(_recorded.items(), key=lambda kv: -kv[1])}, fh, indent=1)
            fh.write("\n")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: on 2 shared cores more only oversubscribe (a step is ~30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """Small real pretraining data (digits images/pairs, stdlib-docstring text, spm model)."""
    from beit3.demo.data import build_demo_data
    from beit3.testing.jobs import TEST_DATA_ARGS

    return build_demo_data(tmp_path_factory.mktemp("demo_data"), **TEST_DATA_ARGS)


@pytest.fixture(scope="session")
def tiny_tokenizer(demo_data, tmp_path_factory):
    """A frozen tiny VQ-KD checkpoint with a k-means-initialized codebook."""
    from beit3.testing.tokenizers import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tokenizer") / "vqkd_tiny.pt", demo_data.image_shards,
                          demo_data.spm_path)


@pytest.fixture(scope="session")
def reference_run(demo_data, tiny_tokenizer, tmp_path_factory):
    """The uninterrupted 2-rank ZeRO-3 run that the loss-curve guard, the pretraining and the guard
    tests compare with (``beit3.testing.jobs.reference_overrides``): launched once per session."""
    from beit3.testing.jobs import launch, reference_overrides

    out = tmp_path_factory.mktemp("reference")
    launch(2, reference_overrides(demo_data, tiny_tokenizer, out))
    return out


def _unmapped_deepspeed_shm() -> list[str]:
    """DeepSpeed's CPU shm allreduce buffers (67 MB per rank per launch in /dev/shm) that no live
    process maps: DeepSpeed 0.19.8 never unlinks them (shm.cpp has no caller of shared_close), so
    each 2-rank launch would leave 134 MB of RAM-backed files behind. A buffer is named after its
    job's rendezvous (``..._<addr>_<port>_<rank>``): one whose port is still reserved belongs to a
    running job (under pytest-xdist, another worker's, between creating and mapping it) and stays."""
    import glob

    from beit3.runtime.ports import is_reserved

    def running(path: str) -> bool:
        parts = path.rsplit("_", 2)
        return len(parts) == 3 and parts[1].isdigit() and is_reserved(int(parts[1]))

    files = [f for f in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*") if not running(f)]
    if not files:
        return []
    mapped: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as fh:
                mapped.update(line.split()[-1] for line in fh if "/dev/shm/deepspeed_allreduce" in line)
        except OSError:  # the process ended while we read
            continue
    return [f for f in files if f not in mapped]


@pytest.fixture(autouse=True)
def _release_deepspeed_shm(request):
    """After each distributed test, remove the shm buffers its finished launches left."""
    yield
    if "distributed" in request.keywords:
        import os

        for path in _unmapped_deepspeed_shm():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
