# Two commands work on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
export CNA_MODEL_CACHE ?= $(HOME)/.cache/cna-models
export CNA_DATA_DIR ?= $(abspath $(SHARED)/data)

DEMO_MODEL ?= qwen2.5-coder-0.5b-instruct

.PHONY: setup models lint test demo bench gpu-check clean

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
	$(BIN)/ruff check cna tests benchmarks launch.py

test: lint models
	$(BIN)/python -m pytest

# What a newcomer came to see, on the offline refusal model: the paper's recipe, the best recipe RESULTS.md found,
# and the random control of the best recipe's size (a 3-job multirun), then a report whose first line says which
# of them reduced refusal, with intervals. Each job writes the contract files into outputs/demo/<n>_.../.
demo: setup
	$(BIN)/python $(SHARED)/models/fetch $(DEMO_MODEL)
	$(BIN)/python launch.py experiment=demo hydra.sweep.dir=outputs/demo resume=false
	$(BIN)/python -m cna.report outputs/demo
	@cat outputs/demo/summary.md

# Speed and memory ratios on the two offline models (about 40 min on 2 CPU cores): benchmarks/results.json.
bench: models
	$(BIN)/python benchmarks/bench.py

# The big-model check list (bf16, sharding, CPU spill, 4/8-bit, padding, ties): a few minutes on any CUDA machine;
# checks that need CUDA print "skipped: no CUDA" elsewhere. Uses $(CNA_MODEL_CACHE)/smollm2-135m-instruct if present.
gpu-check: setup
	$(BIN)/python -m cna.selfcheck

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
