# Two commands work on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
export CNA_MODEL_CACHE ?= $(HOME)/.cache/cna-models
export CNA_DATA_DIR ?= $(abspath $(SHARED)/data)

DEMO_MODEL ?= qwen2.5-coder-0.5b-instruct
DEMO_HUB_ID ?= Qwen/Qwen2.5-Coder-0.5B-Instruct

.PHONY: setup models lint test demo clean

setup: $(VENV)/.installed

# Without a GPU, the CPU torch wheel goes in first, so the package's torch range installs nothing more.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then echo "GPU found: torch comes with the package"; \
	else echo "no GPU: installing the CPU torch wheel"; $(BIN)/pip install --quiet torch==2.13.0; fi
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The real offline models the integration tests use (fetched once into $(CNA_MODEL_CACHE)).
models: setup
	$(BIN)/python $(SHARED)/models/fetch smollm2-135m-instruct qwen2.5-coder-0.5b-instruct

lint: setup
	$(BIN)/ruff check cna tests

test: lint models
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/python $(SHARED)/models/fetch $(DEMO_MODEL)
	$(BIN)/python -m cna discover --model $(DEMO_HUB_ID) --local-name $(DEMO_MODEL) \
		--positive $(CNA_DATA_DIR)/harmful_harmless_splits/harmful_train.json \
		--negative $(CNA_DATA_DIR)/harmful_harmless_splits/harmless_train.json --n 64 \
		--dedup-against $(CNA_DATA_DIR)/jbb_behaviors/harmful-behaviors.csv --dedup-column goal \
		--show $(CNA_DATA_DIR)/jbb_behaviors/harmful-behaviors.csv --show-column goal --show-n 6 \
		--multiplier 0 --out outputs/demo

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
