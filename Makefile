# Set-up and test entry points. `make test` creates .venv, installs everything, runs the suite.
PY ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch first (installs from local disk here), then the project with its test extras.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: install test test-fast demo clean flakes gpu-check

$(STAMP): setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[test]'
	# DeepSpeed JIT-builds its CPU shm comm op at the first CPU/gloo init (~40 s on 2 cores, then
	# cached in ~/.cache/torch_extensions): built here, at install, not inside the first launched test.
	DS_ACCELERATOR=cpu $(PYTHON) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

install: $(STAMP)

# The whole suite: CPU unit tests, multi-process DeepSpeed (gloo) tests, Triton kernels in
# interpreter mode; GPU-only tests are skipped without a GPU.
# One run on 2 pytest-xdist workers, one thread each, a test module per worker at a time (module fixtures
# are built once), the longest modules first (tests/conftest.py, tests/data/module_seconds.json): the
# distributed tests wait more than they compute (fork-served launches, supervisor restarts, watchdog
# timeouts), so unit tests fill the other core. Measured on 2 cores: bench/results/test_durations.md.
# Re-measure the module order: make test PYTEST_ARGS="--record-module-seconds tests/data/module_seconds.json"
test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -ra -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) tests

# The edit loop: the unit tier without its `slow` tests (no multi-process launches, no test over 2 s), 2 workers.
test-fast: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -ra -n 2 -m "not distributed and not slow" $(PYTEST_ARGS) tests

# End to end on small real data (2 CPU ranks): data, SentencePiece, VQ-KD, ZeRO-3 pretraining with a
# checkpoint and a resume, export; pretrained vs random init vs raw pixels (probe, fine-tune, zero-shot); see README.
DEMO_ARGS ?=
demo: install
	$(PYTHON) -m beit3.demo.run --out runs/demo $(DEMO_ARGS)

# Flake hunt: every `distributed` test FLAKE_RUNS times (bench/flakes.py; FLAKE_ARGS e.g. "--hog -k finetune").
FLAKE_RUNS ?= 20
FLAKE_ARGS ?=
flakes: install
	OMP_NUM_THREADS=1 nice -n 10 $(PYTHON) -m bench.flakes --runs $(FLAKE_RUNS) $(FLAKE_ARGS)

# The one GPU check (bench/gpu_check.py): writes bench/results/gpu_*.md; GPU_CHECK_ARGS=--dry-run on CPU.
GPU_CHECK_ARGS ?=
gpu-check: install
	$(PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
