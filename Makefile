# Two commands for a fresh machine: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedmed-installed
DEMO_DIR ?= outputs/demo

.PHONY: demo test lint setup

setup: $(STAMP)

# torch==2.13.0 first: an unpinned torch pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedmed simulate dataset=heart model=svm hydra.run.dir=$(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs --durations=15

lint: $(STAMP)
	$(BIN)/ruff check fedmed tests benchmarks
	$(BIN)/mypy fedmed
