# Every target sets itself up on a fresh machine: a virtual environment in the repo, torch pinned first
# (a CPU wheel; an unpinned torch would pull a multi-GB CUDA build), then the package from constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
MODEL_DIR ?= $(HOME)/.cache/shortened/smollm2-135m-instruct
OUT ?= out/smollm2-shortened

.PHONY: setup test test-fast lint demo bench fetch clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check shortened tests benchmarks

fetch: setup
	$(VENV)/bin/shortened fetch smollm2

test: setup lint
	$(PY) -m pytest -q --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

demo: setup fetch
	$(VENV)/bin/shortened convert --model $(MODEL_DIR) --out $(OUT) --force

bench: setup fetch
	$(PY) benchmarks/bench_ppl_scoring.py --model $(MODEL_DIR)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out
