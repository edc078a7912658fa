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
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q setuptools==84.2.1 wheel==0.48.0
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,mpi]"
	@touch $(STAMP)

run: install
	$(BIN)/python -m adamhd_dist.demo

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/optimizer_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
