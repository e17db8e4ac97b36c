# The two commands of the README. Each sets up what it needs (.venv) first.
SHELL := /bin/bash
VENV := . .venv/bin/activate &&

.PHONY: setup demo test lint unit integration bench

setup:
	@scripts/setup.sh

demo: setup
	$(VENV) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 mtrec demo $(DEMO_ARGS)

lint: setup
	$(VENV) ruff check . && ruff format --check .

test: setup lint
	$(VENV) python -m pytest -q -ra tests

unit: setup
	$(VENV) python -m pytest -q tests/unit

integration: setup
	$(VENV) python -m pytest -q tests/integration

bench: setup
	$(VENV) python -m bench
