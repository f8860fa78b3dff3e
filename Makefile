# Two commands set everything up on a fresh machine with Python 3.11 and pip:
#   make demo   trains the default config on the bundled digits dataset and evaluates it
#   make test   runs the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/digits_drnet

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/python -m dynroute_jax.main --config=configs/digits.py --workdir=$(WORKDIR)

test: install
	$(BIN)/python -m pytest -n auto --dist loadgroup -q tests

.PHONY: install demo test
