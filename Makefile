# Two commands do all set-up on a fresh machine:  `make quickstart` (main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on CPU machines; on a GPU box pass e.g. TORCH="torch==2.13.0" from a CUDA index.
TORCH ?= torch==2.13.0

.PHONY: setup quickstart demo test test-slow bench

$(VENV)/.installed: pyproject.toml
	@echo "set-up: a virtual environment in $(VENV), then $(TORCH) and the project's dependencies (Ray, MLflow,"
	@echo "Optuna, DuckDB...); a few minutes on a fresh machine, once"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	@echo "set-up: torch installed; now the project and its dependencies"
	$(PY) -m pip install -q -e ".[dev]"
	@echo "set-up: done"
	touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(VENV)/bin/moe-sweep run sweeps/quickstart.yaml

demo: setup
	$(VENV)/bin/moe-sweep demo

# The suite without the tests marked slow (multi-process training, Ray sweeps, compile); CI
# runs both targets.
test: setup
	MOE_SWEEP_TEST_ALL_DEPS=1 $(PY) -m pytest -q -m "not slow"

test-slow: setup
	MOE_SWEEP_TEST_ALL_DEPS=1 $(PY) -m pytest -q -m slow

bench: setup
	$(PY) bench/moe_layer.py
