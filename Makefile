# The two commands a newcomer needs:  make demo  (run the demo pipeline)  and  make test  (everything).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Other interpreters the suite runs on: the oldest supported and the newest available get the
# whole unit suite; every one of them runs the "script exits, its telemetry arrives" tests.
OLDEST := 3.10
NEWEST := 3.13
OTHER_PYTHONS := 3.10 3.12 3.13

.PHONY: install pythons demo test lint typecheck unit unit-other e2e stack bench coverage clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the demo pipeline (embedded default: no collector or API key needed).
demo: install
	$(BIN)/stroma demo

## Install everything, build/unpack the native stack (cached outside the repo) and run every test,
## then the unit suite again on the oldest and newest Python.
test: install pythons
	$(BIN)/python -m stroma.stack build
	$(BIN)/ruff check stroma tests bench examples
	$(BIN)/mypy
	STROMA_TEST_PYTHONS="$$(cat $(VENV)/.pythons)" $(BIN)/python -m pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory unit-other

## A virtualenv per other interpreter (.venv-py3.X), listed for the cross-version tests.
pythons: install
	@{ printf '%s ' "$$($(BIN)/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}=" + sys.executable)')"; \
	  for v in $(OTHER_PYTHONS); do printf '%s=%s ' "$$v" "$$(scripts/python-venv $$v)" || exit 1; done; } > $(VENV)/.pythons
	@echo "interpreters: $$(cat $(VENV)/.pythons)"

## The unit suite on the oldest supported and the newest available interpreter.
unit-other: pythons
	for v in $(OLDEST) $(NEWEST); do \
	  STROMA_TEST_PYTHONS="$$v=$$PWD/.venv-py$$v/bin/python" .venv-py$$v/bin/python -m pytest -q -p no:cacheprovider -m "not e2e" || exit 1; \
	done

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
	$(BIN)/python bench/vs_established.py

clean:
	rm -rf $(VENV) .venv-py3.* .pytest_cache .mypy_cache .ruff_cache
