# qlora-orchestrator: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: help install sweep test test-gpu ui bench models lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv and install the project (CPU torch where there is no GPU)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# No GPU: take the CPU build of torch first, so the dependency resolver keeps it.
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q "$(TORCH_CPU)" \
	    || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu; fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

sweep: install  ## run the rank grid on the defaults (tiny model, bundled data, local Ray, ./mlflow.db)
	$(PY) -m orchestrator sweep=rank_grid $(ARGS)

test: install  ## run the CPU test suite (slow tests included; gpu tests skip without a GPU)
	$(PY) -m pytest -q $(ARGS)

test-gpu: install  ## run only the gpu-marked tests
	$(PY) -m pytest -q -m gpu $(ARGS)

ui: install  ## open the MLflow UI on 127.0.0.1:5000 over ./mlflow.db
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000

bench: install  ## run the benchmarks, print ratios, write bench/results/*.json
	$(PY) -m bench $(ARGS)

models: install  ## fetch and convert the known real models ahead of time (smollm2_135m, ~100 MB)
	$(PY) -m qlora.models fetch smollm2_135m

lint: install  ## ruff over the code
	$(VENV)/bin/ruff check qlora orchestrator tests bench

clean:  ## remove generated files (keeps .venv)
	rm -rf outputs multirun mlartifacts mlflow.db .pytest_cache .ruff_cache
