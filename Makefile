# Two commands for a fresh machine: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedmed-installed
# A fresh folder per demo: a simulated site's ledger (its spent budget) lives in the run folder.
DEMO_DIR ?= outputs/demo/$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test lint setup browser

setup: $(STAMP)

# torch==2.13.0 first: an unpinned torch pulls several GB of CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedmed simulate dataset=heart_kits model=svm privacy=dp privacy.target_epsilon=1.0 \
		secagg=secaggplus hydra.run.dir=$(DEMO_DIR)

# The privacy statement's rendering test needs a real browser: Debian's chromium.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; } || \
		echo "WARNING: could not install chromium; the HTML rendering test will be skipped"; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -rs --durations=15 -n 2 --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(BIN)/ruff check fedmed tests benchmarks
	$(BIN)/mypy fedmed
