# imgpipe: `make demo` runs the pipeline on the bundled digits; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean-cache browser screenshot device-wheels

setup: $(STAMP)

# Reinstall only when the dependency list or the lock changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/python -m stages.sample data/raw
	test -f data/raw.dvc || $(BIN)/dvc add data/raw
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@$(BIN)/python -c "import json; m = json.load(open('metrics/eval.json')); \
	  split = json.load(open('metrics/eval_details.json'))['split']; \
	  print(split, ', '.join(f'{k} {v:.4f}' for k, v in m.items() if isinstance(v, float)))"
	@echo "All metrics: $(BIN)/dvc metrics show    Plots: $(BIN)/dvc plots show"
	@echo
	@echo "Compare runs in the MLflow UI:  $(BIN)/mlflow ui   (then open http://127.0.0.1:5000)"

test: setup browser
	$(BIN)/python -m pytest

# tests/test_ui.py drives the system Chromium through chromedriver. Install them when
# missing and we may (root with apt: CI); otherwise stop and say how, never skip the test.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver with apt-get"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	else \
	  echo "error: the UI test needs Chromium and chromedriver; install them" \
	    "(Debian: sudo apt-get install chromium chromium-driver)" >&2; exit 1; \
	fi

# Refresh docs/mlflow-ui.png: real runs on the full sample, compared in the MLflow UI.
screenshot: setup browser
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tests/test_ui.py docs/mlflow-ui.png

lint: setup
	$(BIN)/ruff check .

clean-cache:
	rm -rf .cache/imgpipe

# The wheels a lent GPU machine lacks (MLflow and what it needs), for bench/device.sh there.
device-wheels: setup
	$(BIN)/python bench/device_wheels.py
