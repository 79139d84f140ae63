# `make test` and `make demo` set everything up from scratch on a fresh machine.
PY ?= $(shell command -v python3.12 || command -v python3)
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export JAX_PLATFORMS ?= cpu

.PHONY: test demo setup clean

$(VENV)/.installed: pyproject.toml
	$(PY) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "wanjax needs Python >= 3.12 (jax >= 0.11.2 has no wheels for older Pythons)")'
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test,convert]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider tests

demo: setup
	$(PYTHON) -m infer.demo

clean:
	rm -rf $(VENV) out
