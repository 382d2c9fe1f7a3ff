# imgpipe: `make demo` runs the pipeline on the bundled digits; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean-cache

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
	$(BIN)/dvc metrics show
	@echo
	@echo "Compare runs in the MLflow UI:  $(BIN)/mlflow ui   (then open http://127.0.0.1:5000)"

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .

clean-cache:
	rm -rf .cache/imgpipe
