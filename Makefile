# The two commands of README.md: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hapi-installed
DEMO_DIR ?= run

.PHONY: venv demo test lint clean-demo

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: venv
	$(BIN)/python -m hapi.client.demo --root $(DEMO_DIR)

lint: venv
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q --durations=15

clean-demo:
	-$(BIN)/hapi-swift stop $(DEMO_DIR)/swift
	rm -rf $(DEMO_DIR)
