# Two entry points of the README quickstart; each sets up its own virtualenv first.
#   make demo  - the main job: synthetic dataset -> train -> test -> studies -> report
#   make test  - the whole test suite
VENV ?= .venv
PYTHON ?= python3
# The tested torch pair; override on machines that need another build, e.g.
#   make test TORCH="torch torchvision"
TORCH ?= torch==2.14.1 torchvision==0.29.1
BIN = $(VENV)/bin
DEMO_OUT ?= experiments/runs/synthetic_quick
# Steps at once in the main job (auto: one per CPU core, at most 4), each with cpu_count / (steps
# running) threads: on the 2-core CPU two 1-thread trainings side by side finish sooner than two
# 2-thread ones in turn (README); on a GPU machine a model's test and its study share run together.
DEMO_JOBS ?= auto

.PHONY: setup demo test lint format

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install -q --no-cache-dir $(TORCH)
	$(BIN)/python -m pip install -q --no-cache-dir -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/drcnn run experiments/synthetic_quick.yaml --out $(DEMO_OUT) --jobs $(DEMO_JOBS)

test: setup
	$(BIN)/python -m pytest -n 2 --durations=15

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
