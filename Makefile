PYTHON ?= python3

.PHONY: setup demo test validate lint

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

demo: setup
	$(PYTHON) -m opinionpool.demo

test: setup
	$(PYTHON) -m pytest -q tests

validate: setup
	$(PYTHON) -m validation

lint:
	$(PYTHON) -m ruff check opinionpool tests benchmarks validation applications
