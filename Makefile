# Two entry points, each self-contained on a fresh machine with Python 3.10+:
#   make demo   set up .venv and run the default experiment on the bundled data
#   make test   set up .venv and run the whole test suite (what CI runs)
#   make paper  the paper's three experiments at full size (an accelerator)
#   make map    where the SAM-edge holds: sam-eos map mnist-mlp (~15 min on 2 cores)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test test-quick venv clean figures format paper map

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

# The paper's experiments at their published sizes (presets.py, `paper`):
# each runs `sam-eos run NAME --preset paper --out PAPER_OUT/NAME` (config,
# metrics, figures; its output in run.log), then `sam-eos check` writes the
# claim checks to check.txt. Needs an accelerator; a run resumes if
# interrupted; follow it with `tail -f PAPER_OUT/NAME/run.log`. PAPER_ARGS
# is added to every `run` (the smoke test shrinks the runs with it); the
# target fails if a run fails or a claim does not hold.
PAPER_EXPERIMENTS ?= mnist-mlp cifar10-cnn shakespeare-transformer
PAPER_OUT ?= docs/paper
PAPER_ARGS ?=

paper: venv
	@status=0; for name in $(PAPER_EXPERIMENTS); do \
	  mkdir -p $(PAPER_OUT)/$$name; \
	  $(BIN)/sam-eos run $$name --preset paper --out $(PAPER_OUT)/$$name \
	    $(PAPER_ARGS) > $(PAPER_OUT)/$$name/run.log 2>&1 \
	    || { cat $(PAPER_OUT)/$$name/run.log; exit 1; }; \
	  tail -n 3 $(PAPER_OUT)/$$name/run.log; \
	  $(BIN)/sam-eos check $(PAPER_OUT)/$$name > $(PAPER_OUT)/$$name/check.txt 2>&1 \
	    || status=1; \
	  tail -n 1 $(PAPER_OUT)/$$name/check.txt; \
	done; exit $$status

# The SAM-edge map of the README: `sam-eos map mnist-mlp` into
# docs/figures/edge_map, then the README's paragraph is rewritten from it.
map: venv
	$(BIN)/python docs/make_figures.py --map
