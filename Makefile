# medconv_ext developer commands. On a fresh machine `make test` creates .venv, installs the
# pinned requirements, builds the extension (CUDA sources too whenever nvcc and a CUDA torch
# are present, so CI proves they compile and link) and runs the whole test suite.
# Use an existing interpreter instead of a venv:  make test PYTHON=python3 VENV=
VENV ?= .venv
ifeq ($(strip $(VENV)),)
PYTHON ?= python3
STAMP :=
else
PYTHON ?= $(VENV)/bin/python
STAMP := $(VENV)/.medconv-deps
endif
# Build the CUDA sources whenever nvcc is present, even without a GPU (MEDCONV_CPU_ONLY=1 skips).
FORCE_CUDA ?= $(if $(shell command -v nvcc 2>/dev/null),1,0)
export FORCE_CUDA
PYTEST_ARGS ?=
BENCH_ARGS ?=
# make test-cuda-emu EMU_ARGS=--full : all dtypes, the WMMA path, all schedule variants (docs/cuda_on_cpu.md)
EMU_ARGS ?=

.PHONY: all setup build test test-cuda-emu bench wheel clean

all: test

$(STAMP): requirements-dev.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -r requirements-dev.txt
	touch $@

setup: $(STAMP)

build: setup
	$(PYTHON) setup.py build_ext --inplace

test: build
	PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest tests -ra $(PYTEST_ARGS)

# The CUDA kernels compiled for the CPU and emulated (ASan/UBSan, NaN-poisoned memory, shuffled
# schedules), checked against the GPU tests' cases and references: no GPU needed (docs/cuda_on_cpu.md).
test-cuda-emu: build
	PYTHONPATH=$(CURDIR) $(PYTHON) tests/cuda_on_cpu/run.py $(EMU_ARGS)

bench: build
	$(PYTHON) -m pip install -q --no-deps -r requirements-bench.txt
	PYTHONPATH=$(CURDIR) $(PYTHON) bench/run_all.py $(BENCH_ARGS)

wheel: setup
	FORCE_CUDA=1 $(PYTHON) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info medconv_ext/_C*.so
