# Set-up and entry points. `make run` and `make test` create .venv and install on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The official evaluator pins very old numpy/pandas/jax/tensorflow; install it without its deps,
# after ours (see DESIGN.md). The Dockerfile installs the same pin the same way.
WAYMO := waymo-open-dataset-tf-2-12-0==1.6.7
# glibc hands TensorFlow's large buffers back to the kernel after every op; these keep them
# (the official evaluator runs about 2x faster).
export MALLOC_MMAP_THRESHOLD_ ?= 17179869184
export MALLOC_TRIM_THRESHOLD_ ?= 17179869184
export MALLOC_TOP_PAD_ ?= 1073741824
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Subprocesses that call `python` or `ray` (Ray Jobs, the tests' local cluster) get the venv's.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	$(PY) -m pip install --no-deps $(WAYMO)
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) pipelines/sft_rft_sft.py

test: install
	$(PY) -m pytest -q --timeout=1500 --durations=25

test-fast: install
	$(PY) -m pytest -q -m "not slow" --timeout=600

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
