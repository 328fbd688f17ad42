# The two commands of the README. Both set everything up themselves on a fresh machine:
# a .venv, the CPU build of torch first (so nothing pulls a CUDA build), then the project.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# DeepSpeed JIT-builds a CPU op whose build flags name the venv's paths: one cache per venv,
# so two checkouts never rebuild each other's (~90 s per build).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch-extensions
# The venv first on PATH: its `deepspeed`, `ray`, `mlflow` and its `ninja` (another ninja
# hashes the same build differently and triggers that rebuild too).
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m harness.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo runs
