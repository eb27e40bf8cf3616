# The two commands.  Both set up everything they need on a fresh machine.
#   make demo   the main job on built-in sample data
#   make test   the whole test suite (what .ci/run calls)
VENV ?= $(HOME)/.cache/mmpipe/venv
export MMPIPE_VENV := $(VENV)

.PHONY: demo test lint bench help
help:
	@echo "make demo   - run the main job on built-in sample data (sets up its own environment)"
	@echo "make test   - run the whole test suite (sets up its own environment)"
	@echo "make lint   - ruff"
	@echo "make bench  - every benchmark, the parity matrix and the fault suite; rewrites bench/RESULTS.md"

demo:
	@.ci/bootstrap.sh train
	$(VENV)/bin/mmpipe --log-level WARNING demo $(ARGS)

test:
	@.ci/bootstrap.sh test
	$(VENV)/bin/ruff check pipeline exporters deploy tests bench examples
	$(VENV)/bin/python -m pytest $(ARGS)

lint:
	@.ci/bootstrap.sh test
	$(VENV)/bin/ruff check pipeline exporters deploy tests bench examples

bench:
	@.ci/bootstrap.sh test
	$(VENV)/bin/python -m bench.run_all $(ARGS)
