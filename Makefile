# vcl_jax — common commands. `make help` lists them.
PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
EXP ?= vcl_diffusion
PRESET ?= cpu
ARGS ?=
# The offline data beside the checkout, unless the environment names other roots (an empty
# value counts as unset: `?=` alone would keep it and leave only the tfds download).
ifeq ($(strip $(VCL_JAX_DATA_DIR)),)
export VCL_JAX_DATA_DIR := $(abspath ../shared/data)
endif

.PHONY: help install test test-slow test-classifiers test-all lint experiment bench gpu-check gpu-data clean-cache

help:
	@echo "make install                  venv in .venv with vcl_jax and dev tools"
	@echo "make test                     the default test suite (~6 min from a clean clone on 2 cores)"
	@echo "make test-slow                the tests marked slow (end to end; CI runs them too)"
	@echo "make test-classifiers         the evaluation classifiers trained from scratch on real data"
	@echo "make test-all                 everything, with the tests marked slow and classifier"
	@echo "make lint                     ruff"
	@echo "make experiment EXP=vcl_diffusion PRESET=cpu [ARGS='key=value ...']"
	@echo "make bench                    benchmarks (prints figures, writes benchmarks/results.json)"
	@echo "make gpu-data                 copy the full MNIST into .gpudata/ (git-ignored) for a GPU machine"
	@echo "make gpu-check [DATA=.gpudata] the prepared GPU check (benchmarks/gpu_check.py, <= 9 min)"

install:
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e '.[dev,tensorboard]'

# Two workers, each test file whole in one (its module fixtures run once): a clean clone's
# default suite took 404 s this way against 552-628 s in one process (2 cores; BENCHMARKS.md).
test:
	$(PY) -m pytest -q -m "not slow and not classifier" -n 2 --dist loadfile --durations=12

test-slow:
	$(PY) -m pytest -q -m "slow and not classifier" -n 2 --dist loadfile --durations=12

test-classifiers:
	$(PY) -m pytest -q -m classifier

test-all:
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check vcl_jax experiments tests benchmarks

experiment:
	$(PY) -m experiments.$(EXP) --preset $(PRESET) $(ARGS)

DATA ?= .gpudata
# The GPU machine has no ../shared: the data travels inside the checkout, in a git-ignored
# folder named in the run's `carry`.
gpu-data:
	mkdir -p $(DATA)/mnist-full && cp ../shared/data/mnist-full/*.gz $(DATA)/mnist-full/

gpu-check:
	$(PY) -m benchmarks.gpu_check --data $(DATA)

bench:
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.split_mnist --step-comparison
	$(PY) -m benchmarks.fisher
	$(PY) -m benchmarks.vcl_estimators
	$(PY) -m benchmarks.cpu_preset

clean-cache:
	rm -rf $(HOME)/.cache/vcl_jax
