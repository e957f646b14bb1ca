# The two commands: `make demo` and `make test`. Both create .venv if missing and
# install torch first (CPU wheel by default; override TORCH_SPEC for CUDA builds),
# then the package with its dev extra, every other package at the exact version of
# constraints.txt (the versions the test suite passed with; `make lock` refreshes it;
# `CONSTRAINTS=` installs from setup.cfg's ranges instead).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_DIR ?= data/phantoms
DEMO_MINUTES ?= 5
DEMO_OUT ?= outputs/demo
PYTEST_ARGS ?=
CONSTRAINTS ?= constraints.txt
LOCK_VENV ?= /tmp/segan-lock-venv
SEGAN := $(BIN)/segan
# When this `make` began (ms since the epoch): the demo's comparison shows only the runs it made.
DEMO_SINCE := $(shell date +%s)000
MLFLOW_UI := MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlflow_runs/mlflow.db --workers 1

.PHONY: install demo test lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml $(CONSTRAINTS)
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The main job end to end on generated phantoms: prepare, check, train SegAN and the
# supervised baseline, each planned from the data for DEMO_MINUTES (`segan train --data`,
# as for a user's own data; the shipped configs need ~12 min for SegAN to finish its
# schedule on 2 CPU cores), predict the test scans, evaluate, compare this demo's runs
# (earlier demos' runs stay in the experiment; compare says how many).
demo: install
	@echo "make demo: trains 2 models for up to $(DEMO_MINUTES) minutes each (DEMO_MINUTES), plus about a minute"
	$(SEGAN) prepare phantoms --out $(DEMO_DIR) --cases 24 --size 96 --seed 0
	$(SEGAN) prepare check $(DEMO_DIR)
	$(SEGAN) train --data $(DEMO_DIR) --method supervised --minutes $(DEMO_MINUTES) --set experiment=demo --out $(DEMO_OUT)/supervised
	$(SEGAN) train --data $(DEMO_DIR) --method segan --minutes $(DEMO_MINUTES) --set experiment=demo --out $(DEMO_OUT)/segan
	$(SEGAN) predict -m $(DEMO_OUT)/segan -i $(DEMO_DIR)/imagesTs -o $(DEMO_OUT)/predictions --overwrite
	$(SEGAN) evaluate -p $(DEMO_OUT)/predictions -g $(DEMO_DIR)/labelsTs --out $(DEMO_OUT)/metrics.csv
	@echo "The runs of this demo (runs of earlier demos stay in the experiment; the last line counts them):"
	$(SEGAN) compare -e demo --filter "attributes.start_time >= $(DEMO_SINCE)"
	@echo ""
	@echo "Demo outputs (a new make demo replaces them):"
	@echo "  $(DEMO_OUT)/segan/ and $(DEMO_OUT)/supervised/: checkpoints (best.pt, last.pt), config.yaml, plan.yaml (each key's reason)"
	@echo "  $(DEMO_OUT)/predictions/: SegAN's masks of the test scans, predictions.csv"
	@echo "  $(DEMO_OUT)/metrics.csv: per-case test metrics (Dice, IoU, HD95, precision, sensitivity)"
	@echo "  mlflow_runs/artifacts/demo/<run id>/artifacts/: curves.png, overlays/ (validation slices, contours)"
	@echo "See the runs in the MLflow UI, then open http://127.0.0.1:5000:"
	@echo "  source $(VENV)/bin/activate"
	@echo "  $(MLFLOW_UI)"
	@echo "Next, on your own data (README: Your own data): plan a config from the data set and train it:"
	@echo "  segan plan /path/to/MSD_folder --method segan --minutes 15 -o my_plan.yaml"
	@echo "  segan train --data /path/to/MSD_folder --method supervised --minutes 15   # the baseline to compare with"

test: install
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

# Refresh constraints.txt: a fresh venv from setup.cfg's ranges (the newest releases), the
# whole suite, then its exact versions (torch, which TORCH_SPEC installs, segan itself and
# CUDA wheels left out). Commit the new file once the suite passed; a failing suite keeps the old one.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q $(TORCH_SPEC)
	$(LOCK_VENV)/bin/pip install -q -e ".[dev]"
	$(LOCK_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
	{ echo "# Exact versions the test suite passed with, on Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())') (refresh: \`make lock\`);"; \
	  echo "# $(TORCH_SPEC) installed first (not listed, nor segan itself or CUDA wheels)."; \
	  echo "# \`make install|test|demo\` install with \`pip install -c constraints.txt\`; setup.cfg keeps the ranges."; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable --exclude torch | grep -v -i -E '^(nvidia-|triton|cuda)'; \
	} > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) outputs .pytest_cache
