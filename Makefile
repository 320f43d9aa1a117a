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
# setup.py builds the CUDA sources whenever nvcc and a CUDA build of torch are present, even
# without a GPU (the same rule as `pip install .`); FORCE_CUDA=1 requires them, FORCE_CUDA=0 or
# MEDCONV_CPU_ONLY=1 skips them.
PYTEST_ARGS ?=
BENCH_ARGS ?=
# make test-cuda-emu EMU_ARGS=--full : all dtypes, the WMMA path, all schedule variants (docs/cuda_on_cpu.md)
EMU_ARGS ?=

.PHONY: all setup build test test-cuda-emu test-triton-aot gpu-check-dry-run bench wheel clean

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

# Every launch configuration of every Triton kernel compiled ahead of time for sm_80 and sm_90 on the CPU
# (shared memory, register spills; must agree with triton_kernels/_configs.PRUNED): a few minutes.
test-triton-aot: setup
	MEDCONV_AOT_FULL=1 PYTHONPATH=$(CURDIR) $(PYTHON) -m pytest tests/test_triton_aot.py -ra $(PYTEST_ARGS)

# bench/gpu_check.sh on the CPU at tiny sizes (no GPU, no sanitizer, no rebuild); on a GPU: bash bench/gpu_check.sh
gpu-check-dry-run: setup
	PYTHON=$(PYTHON) bash bench/gpu_check.sh --dry-run

# Representative set (at most ~10 min on 2 CPU cores), results in bench/out/ (untracked), then a
# summary table. Every case: make bench BENCH_ARGS=--full; committed results: BENCH_ARGS=--update-results
bench: build
	$(PYTHON) -m pip install -q --no-deps -r requirements-bench.txt
	PYTHONPATH=$(CURDIR) $(PYTHON) bench/run_all.py $(BENCH_ARGS)

# A wheel with the CUDA kernels (FORCE_CUDA=1: fails if nvcc or a CUDA torch is missing); it
# requires exactly the torch release it was built with. CPU-only wheel: make wheel FORCE_CUDA=0
FORCE_CUDA ?= 1
wheel: setup
	FORCE_CUDA=$(FORCE_CUDA) $(PYTHON) -m pip wheel -v --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info medconv_ext/_C*.so medconv_ext/_build_info.py
