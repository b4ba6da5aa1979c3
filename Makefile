# Two commands on a fresh machine with Python >= 3.10 and make: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-slow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever setup.py changes.
$(INSTALLED): setup.py | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

demo: $(INSTALLED)
	$(BIN)/python -m jackpot_jax.experiments.obrs_simulation --out runs/obrs_simulation

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Everything, plus the checks too long for CI (marker `slow`), with 2,000 examples per property.
test-slow: $(INSTALLED)
	$(BIN)/python -m pytest -m "slow or not slow" --hypothesis-profile=thorough $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
