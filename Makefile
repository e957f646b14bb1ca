# The two commands: `make demo` and `make test`. Both create .venv if missing and
# install torch first (CPU wheel by default; override TORCH_SPEC for CUDA builds),
# then the package with its dev extra.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_DIR ?= data/phantoms
PYTEST_ARGS ?=

.PHONY: install demo test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/segan prepare phantoms --out $(DEMO_DIR) --cases 24 --size 96 --seed 0
	$(BIN)/segan prepare check $(DEMO_DIR)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
