# Two commands on a fresh machine:
#   make demo   installs everything and runs the built-in default job (digits distillation)
#   make test   installs everything and runs the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean

setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/bin/kd-tasks demo

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
