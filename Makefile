# Two entry points, each self-contained on a fresh machine with Python 3.10+:
#   make demo   set up .venv and run the default experiment on the bundled data
#   make test   set up .venv and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-quick venv clean figures format

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(BIN)/sam-eos run

test: venv
	$(BIN)/python -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

test-quick: venv
	$(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

# Formats the code (pyink, configured in pyproject.toml); tests check it.
format: venv
	$(BIN)/pyink sam_eos tests benchmarks docs

clean:
	rm -rf $(VENV) runs .pytest_cache

# Reruns the cpu presets into docs/figures and rewrites the README's table.
figures: venv
	$(BIN)/python docs/make_figures.py
