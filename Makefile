# Fresh clone -> `make demo` (4-rank CPU/gloo demo) or `make test` (the test suite); `make gpu-check` on a GPU machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
NPROC ?= 4
DEMO_ARGS ?=

.PHONY: demo test lint format venv clean gpu-check mutants

$(BIN)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[test,lint,plot,megatron,transformers,trainer]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) examples/demo.py $(DEMO_ARGS)

test: venv
	$(BIN)/python -m pytest -q

# ruff (configured in pyproject.toml): lint and formatting, as CI runs them before the tests
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# one-line semantic mutations of the library, each against its targeted tests (tests/mutants.py, docs/mutants.md)
mutants: venv
	$(BIN)/python tests/mutants.py

# on an NVIDIA machine whose python3 has torch (installs nothing); report in $$GPU_REPORT_DIR (./gpu_report/)
gpu-check:
	PYTHON=$${PYTHON:-$(PY)} bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .hypothesis
