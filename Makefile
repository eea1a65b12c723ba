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

.PHONY: help install test test-all test-fast lint experiment bench clean-cache

help:
	@echo "make install                  venv in .venv with vcl_jax and dev tools"
	@echo "make test                     the test suite CI runs (< 10 min; real-data classifiers included)"
	@echo "make test-all                 also the tests marked slow (resume after SIGKILL)"
	@echo "make test-fast                without the classifier trainings (minutes less)"
	@echo "make lint                     ruff"
	@echo "make experiment EXP=vcl_diffusion PRESET=cpu [ARGS='key=value ...']"
	@echo "make bench                    benchmarks (prints figures, writes benchmarks/results.json)"

install:
	python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e '.[dev]'

test:
	$(PY) -m pytest -q -m "not slow"

test-all:
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow" -k "not classifier_trained and not fashion_mnist_classifier"

lint:
	$(PY) -m ruff check vcl_jax experiments tests benchmarks

experiment:
	$(PY) -m experiments.$(EXP) --preset $(PRESET) $(ARGS)

bench:
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.split_mnist
	$(PY) -m benchmarks.fisher
	$(PY) -m benchmarks.vcl_estimators

clean-cache:
	rm -rf $(HOME)/.cache/vcl_jax
