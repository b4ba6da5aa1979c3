# Two commands on a fresh machine with Python >= 3.10 and make: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist processes; each test file runs in one of them (its module fixtures built once).
# TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile

.PHONY: demo simulation test test-slow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever setup.py changes.
$(INSTALLED): setup.py | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

# Jackpot RL on the CPU (configs/demo.py): warm start, then a tiny actor trains a larger policy.
demo: $(INSTALLED)
	rm -rf runs/demo
	$(BIN)/jackpot-train --workdir runs/demo
	$(BIN)/jackpot-plot runs/demo

# The OBRS simulation of the paper's Figure 2 (docs/obrs_simulation.md).
simulation: $(INSTALLED)
	$(BIN)/python -m jackpot_jax.experiments.obrs_simulation --out runs/obrs_simulation

test: $(INSTALLED)
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# Everything, plus the checks too long for CI (marker `slow`), with 2,000 examples per property.
test-slow: $(INSTALLED)
	$(BIN)/python -m pytest $(XDIST) -m "slow or not slow" --hypothesis-profile=thorough $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
