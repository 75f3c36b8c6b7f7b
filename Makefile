# Two commands do all setup and work: `make full` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: full test test-e2e test-slow test-faults lint bench venv clean

# The venv is rebuilt only when pyproject.toml changes (idempotent and fast when present).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1" || \
		$(BIN)/python -m pip install --quiet torch torchvision
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

full: $(STAMP)
	$(BIN)/python -m pipeline full $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -m e2e $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(ARGS)

test-faults: $(STAMP)
	$(BIN)/python -m pytest -m faults $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_ga_rpn.py $(if $(wildcard runs/default/summary.json),--trained runs/default)
	$(BIN)/python benchmarks/bench_proposal_cache.py
	$(BIN)/python benchmarks/bench_sparse_head.py $(if $(wildcard runs/default/summary.json),--trained runs/default)
	$(BIN)/python benchmarks/bench_proposal_eval.py
	$(BIN)/python benchmarks/bench_scale.py

clean:
	rm -rf $(VENV)
