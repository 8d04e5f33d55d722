# pagent developer commands. `make demo` and `make test` are the README's two commands.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := all
.PHONY: install demo format lint test test-fast bench clean all

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/pagent run pipelines/parallel_processing.yaml --data pipelines/data/numbers.json \
		--output demo-output.json --store memory://
	@echo "--- demo-output.json:" && cat demo-output.json && echo

format: install
	$(BIN)/ruff check --fix parallel_agent tests bench
	$(BIN)/ruff format parallel_agent tests bench

lint: install
	$(BIN)/ruff check parallel_agent tests bench
	$(BIN)/ruff format --check parallel_agent tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# Bytecode first: machines that set PYTHONDONTWRITEBYTECODE (these do) would otherwise compile
# every module again in each of the hundreds of `pagent` processes the tests start.
test: install
	$(BIN)/python -m compileall -q parallel_agent tests
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow and not fault"

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf .mypy_cache .ruff_cache .pytest_cache build dist *.egg-info demo-output.json
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

all: lint test
