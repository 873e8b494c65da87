# STORE — the two commands a fresh machine needs:
#   make run    create .venv, install (pinned CPU torch first), run the pipeline on MovieLens 100K
#   make test   create/update .venv with dev extras, run the test suite (what CI runs)
# Test tiers (pytest markers, registered in pyproject.toml):
#   make test       every test not marked `slow` (CI's suite: .ci/run, .github/workflows); lists the 15 slowest
#   make test-fast  the inner loop: also leaves out `pipeline` (trains the tiny models) and
#                   `service` (starts servers or CLI processes); under 3 min on 2 cores
#   make test-slow  only the `slow` tests (the 1M-row DuckDB lookups, kill-at-every-point of
#                   training and of the catalogue write, ZeRO-3 across two processes, the
#                   Dask cluster of separate processes, two `store serve` stacks side by side)
# Others: make lint (ruff + mypy), make clean.
# Both installs take exact versions from constraints.txt (what the tests were recorded with;
# a newer numpy or scikit-learn moves the pinned semantic IDs of tests/test_tiny_pinned.py).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch, installed before the project so nothing pulls a multi-GB CUDA wheel.
# On machines without a local torch file, add the CPU index:
#   make run TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
CONFIG ?= ml-100k
ARGS ?=

export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: run test test-fast test-slow lint format clean install install-dev

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml constraints.txt $(VENV)/.torch
	$(BIN)/pip install --quiet -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt $(VENV)/.torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/store run --config $(CONFIG) $(ARGS)

test: install-dev
	$(BIN)/pytest -q --durations=15

test-fast: install-dev
	$(BIN)/pytest -q -m "not slow and not pipeline and not service"

test-slow: install-dev
	$(BIN)/pytest -q -m slow

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) workspace workspace-tiny workspace-scientific .pytest_cache .mypy_cache .ruff_cache
