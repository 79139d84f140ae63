# `make test` and `make demo` set everything up from scratch on a fresh machine.
# The first interpreter >= 3.12 that actually runs (pyenv shims of inactive versions don't).
PY ?= $(shell for c in python3.12 python3.13 python3 $$HOME/.pyenv/versions/3.12*/bin/python3 $$HOME/.pyenv/versions/3.13*/bin/python3; do \
	$$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { command -v $$c; break; }; done)
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export JAX_PLATFORMS ?= cpu

.PHONY: test demo setup clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PY)" || { echo "wanjax needs Python >= 3.12 (jax >= 0.11.2 has no wheels for older Pythons); set PY=/path/to/python3.12" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test,convert]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PYTHON) -m pytest -p no:cacheprovider tests

demo: setup
	$(PYTHON) -m infer.demo

clean:
	rm -rf $(VENV) out
