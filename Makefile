# `make test` and `make demo` set everything up from scratch on a fresh machine.
# The first interpreter >= 3.12 that actually runs (pyenv shims of inactive versions don't).
PY ?= $(shell for c in python3.12 python3.13 python3 $$HOME/.pyenv/versions/3.12*/bin/python3 $$HOME/.pyenv/versions/3.13*/bin/python3; do \
	$$c -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { command -v $$c; break; }; done)
VENV ?= .venv
PYTHON := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export JAX_PLATFORMS ?= cpu
# pytest-xdist workers for `make test` (the CI machine has 2 cores; each worker holds one tiny-model
# test file at a time, a few GiB at most)
TEST_WORKERS ?= 2

.PHONY: test demo setup clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PY)" || { echo "wanjax needs Python >= 3.12 (jax >= 0.11.2 has no wheels for older Pythons); set PY=/path/to/python3.12" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test,convert]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PYTHON) -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile tests

demo: setup
	$(PYTHON) -m infer.demo

clean:
	rm -rf $(VENV) out

# `make results`: the synthetic world end to end (train VAE -> teacher -> targets -> distilled
# student -> held-out evaluation), then copy its report, images and the bundled default into the
# repository. Sized for one H100 (~8 min); on a CPU-only machine it runs the same code, very slowly.
RESULTS_OUT ?= out/world/full
.PHONY: results
results: export JAX_PLATFORMS = $(RESULTS_PLATFORMS)
results: setup
	$(PYTHON) -m train.world --config configs/world.py:full --config.out_dir=$(RESULTS_OUT)
	mkdir -p docs/img assets
	cp $(RESULTS_OUT)/docs/RESULTS.md docs/RESULTS.md
	cp $(RESULTS_OUT)/docs/img/*.png docs/img/
	rm -rf assets/default && cp -r $(RESULTS_OUT)/assets/default assets/default
