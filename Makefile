# `make test` and `make demo` bootstrap a virtual environment at .venv (idempotent), then run.
# Bring your own torch (e.g. a CUDA build) by installing it into .venv first; otherwise the
# CPU wheel $(TORCH_SPEC) is installed.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rectiflow-installed
PYTEST_ARGS ?=

.PHONY: venv test lint format demo toy-table soak clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# Lint and format check (ruff, configured in pyproject.toml); `make format` applies the formatter.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(VENV)/bin/rectiflow run configs/toy2d.yaml

toy-table: $(STAMP)
	$(PY) benchmarks/toy_table.py

# Chaos soak: the toy pipeline SIGKILLed at random times until it finishes, then compared with a
# clean run (bounded: 5 kills, 15 minutes; e.g. make soak SOAK_ARGS="--kills 20 --max-minutes 60").
SOAK_ARGS ?=
soak: $(STAMP)
	$(PY) tests/faults/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
