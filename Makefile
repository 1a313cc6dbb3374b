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
	touch $(STAMP)

install: $(STAMP)

# The whole suite: CPU unit tests, multi-process DeepSpeed (gloo) tests, Triton kernels in
# interpreter mode; GPU-only tests are skipped without a GPU.
test: install
	$(PYTHON) -m pytest -ra $(PYTEST_ARGS) tests

# The edit loop: the unit tier without its `slow` tests (no multi-process launches, no test over 2 s).
test-fast: install
	$(PYTHON) -m pytest -ra -m "not distributed and not slow" $(PYTEST_ARGS) tests

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
