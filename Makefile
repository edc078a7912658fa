# Two commands for a fresh machine:  make run  |  make test   (each creates .venv when missing)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The torch pin lives in pyproject.toml; install it first so that nothing else pulls a different build.
TORCH  := $(shell grep -oE '"torch==[^"]+"' pyproject.toml | tr -d '"')
PYTEST_ARGS ?=

.PHONY: install run test bench clean

install: $(STAMP)

# deepspeed is installed without build isolation: its setup.py must see the torch installed just before it.
$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt setuptools wheel
	$(BIN)/python -m pip install -q -c constraints.txt "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt --no-build-isolation -e ".[test,mpi]"
	@touch $(STAMP)

run: install
	$(BIN)/python -m adamhd_dist.demo

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/optimizer_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
