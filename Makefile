# The two commands a newcomer needs:  make demo  (run the demo pipeline)  and  make test  (everything).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint typecheck unit e2e stack bench coverage clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the demo pipeline (embedded default: no collector or API key needed).
demo: install
	$(BIN)/stroma demo

## Install everything, build/unpack the native stack (cached outside the repo) and run every test.
test: install
	$(BIN)/python -m stroma.stack build
	$(BIN)/ruff check stroma tests bench examples
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check stroma tests bench examples
	$(BIN)/ruff format --check stroma tests bench examples

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/python -m pytest -q -m "not e2e"

e2e: install
	$(BIN)/python -m stroma.stack build
	$(BIN)/python -m pytest -q -m e2e

stack: install
	$(BIN)/python -m stroma.stack build

## Line and branch coverage of stroma/ over the whole suite.
coverage: install
	$(BIN)/python -m stroma.stack build
	$(BIN)/python -m pytest -q -p no:cacheprovider --cov=stroma --cov-branch --cov-report=term:skip-covered

bench: install
	$(BIN)/python bench/step_overhead.py
	$(BIN)/python bench/pipeline_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
