# The two user commands are `make demo` and `make test`; both run `setup` first and are idempotent.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# torch first, alone and pinned: this pin is satisfied by the local CPU wheel; any other spec
# (or letting another package pull torch) downloads several GB of CUDA wheels.
TORCH := torch==2.13.0

.PHONY: setup demo test bench mlflow-ui clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@command -v java >/dev/null || { echo "error: Java 17 is required by Spark (java not on PATH)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check
	@touch $@

demo: setup
	$(VENV)/bin/recsys demo

test: setup
	$(PY) -m pytest

# About 1.5 hours on 2 cores; quality needs ../shared/data/amazon_toys_sequences.txt.
bench: setup
	$(PY) bench/etl.py
	$(PY) bench/loader.py
	$(PY) bench/nearline.py
	$(PY) bench/quality.py

# The MLflow UI over this lakehouse's tracking store (ROOT=... for another lakehouse).
mlflow-ui: setup
	$(VENV)/bin/recsys ui $(if $(ROOT),--root $(ROOT))

clean:
	rm -rf lakehouse demo-data .pytest_cache
