# The two commands of the README. Each sets up what it needs (.venv) first.
SHELL := /bin/bash
VENV := . .venv/bin/activate &&

.PHONY: setup system-deps demo test lint unit integration bench

setup:
	@scripts/setup.sh

# the tests run a real Prometheus server (Debian's package; installed here when missing)
system-deps:
	@scripts/system-deps.sh

demo: setup
	$(VENV) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 mtrec demo $(DEMO_ARGS)

lint: setup
	$(VENV) ruff check . && ruff format --check .

test: setup system-deps lint
	$(VENV) python -m pytest -q -ra tests/unit tests/integration  # unit first: no session Ray running beside them

# the fast tier: unit tests without the slow ones (real language models, training for more than a few seconds)
unit: setup
	$(VENV) python -m pytest -q -m "not slow" tests/unit

integration: setup system-deps
	$(VENV) python -m pytest -q -ra tests/integration

bench: setup
	$(VENV) python -m bench
