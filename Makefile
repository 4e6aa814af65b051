# Set-up and everyday jobs. A fresh machine needs only `make demo` or `make test`:
# each creates .venv (CPU torch from constraints.txt) and installs bgekit with its dev extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bgekit-installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The main job on the offline default model: embed the example passages, then rerank them.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/bgekit embed --input examples/passages.jsonl --output out/passages.npy
	HF_HUB_OFFLINE=1 $(BIN)/bgekit search-demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
