# Every target sets itself up on a fresh machine: a virtual environment in the repo, torch pinned first
# (a CPU wheel; an unpinned torch would pull a multi-GB CUDA build), then the package from constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
MODEL_DIR ?= $(or $(SHORTENED_CACHE),$(HOME)/.cache/shortened)/smollm2-135m-instruct
OUT ?= out/smollm2-shortened
# Real text from ../shared/data where it exists (this project's machines); elsewhere Hugging Face datasets.
SHARED ?= ../shared/data
CALIB ?= $(if $(wildcard $(SHARED)/text/corpus_en.txt),$(SHARED)/text/corpus_en.txt,hf:wikitext:wikitext-2-raw-v1)
EVAL ?= $(if $(wildcard $(SHARED)/wikitext2/test.raw.txt),$(SHARED)/wikitext2/test.raw.txt,wikitext2)

.PHONY: setup setup-optimum test test-optimum test-fast lint demo bench fetch clean

# The second environment: Optimum's exporter (optimum-onnx) needs transformers<4.58; tests/optimum run there.
VENV_OPT ?= .venv-optimum
PY_OPT := $(VENV_OPT)/bin/python

# .base: what `make demo` needs (the package, onnxruntime, matplotlib); .installed adds the test and optional extras
$(VENV)/.base: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[onnx,plot]"
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

setup: $(VENV)/.installed

$(VENV_OPT)/.installed: pyproject.toml constraints-optimum.txt
	$(PYTHON) -m venv $(VENV_OPT)
	$(PY_OPT) -m pip install -q --upgrade pip
	$(PY_OPT) -m pip install -q $(TORCH)
	$(PY_OPT) -m pip install -q -c constraints-optimum.txt "transformers<4.58" optimum-onnx onnxruntime onnxscript onnx-ir \
		safetensors tqdm numpy pytest
	$(PY_OPT) -m pip install -q --no-deps -e .
	touch $@

setup-optimum: $(VENV_OPT)/.installed

test-optimum: setup setup-optimum
	$(PY_OPT) -m pytest -q --durations=5 tests/optimum

# ruff check, ruff format (each remaining `# fmt: skip` is deliberate) and the layer contract in pyproject.toml
lint: setup
	$(VENV)/bin/ruff check shortened tests benchmarks
	$(VENV)/bin/ruff format --check shortened tests benchmarks
	$(VENV)/bin/lint-imports

fetch: $(VENV)/.base
	$(VENV)/bin/shortened fetch smollm2

test: setup lint setup-optimum
	$(PY) -m pytest -q --durations=15 --ignore=tests/optimum
	$(PY_OPT) -m pytest -q --durations=5 tests/optimum

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

demo: fetch
	$(VENV)/bin/shortened convert $(MODEL_DIR) --config examples/smollm2.toml --out $(OUT) \
		--calib $(CALIB) --eval-text $(EVAL) --force

bench: setup fetch
	$(PY) benchmarks/bench_ppl_scoring.py --model $(MODEL_DIR) --calib $(CALIB)
	$(PY) benchmarks/bench_speed.py --model $(MODEL_DIR)
	$(PY) benchmarks/bench_quantized.py --model $(MODEL_DIR)
	$(PY) benchmarks/bench_speed_repeat.py --model $(MODEL_DIR)
	$(PY) benchmarks/bench_recovery.py --model $(MODEL_DIR) --calib $(CALIB) --eval $(EVAL) --selections topk,span,iterative \
		--iterative-both --prune

clean:
	rm -rf $(VENV) $(VENV_OPT) .pytest_cache .ruff_cache out

# On a CUDA machine, with the python found there (torch with CUDA, transformers 5.x): no virtual environment of
# ours, no download; what is absent (SmolLM2, onnxruntime-gpu, TensorRT, matplotlib) is skipped and said.
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(PYTHON) benchmarks/gpu_check.py --out out/gpu-check \
		--model $(MODEL_DIR)
