# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Both create the virtual environment on first use; nothing needs a GPU or the network
# beyond the package index.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint

setup: $(STAMP)

# torch is pinned to the local CPU wheel first: a bare requirement would pull a CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: setup
	$(PY) -m qsparse_compile demo

test: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
