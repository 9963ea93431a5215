# bssfp2dt: every task a developer or CI runs. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; a CUDA machine may override it: make install TORCH_SPEC="torch==2.13.0"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: help install test test-fast simulate-demo clean

help:
	@echo "make install   create $(VENV) and install bssfp2dt with its test dependencies"
	@echo "make test      run the test suite (what CI runs)"
	@echo "make simulate-demo  write a 2-subject simulated BIDS dataset to demo/bids"

$(STAMP): pyproject.toml version
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

test-fast: install
	$(BIN)/python -m pytest -q -x -m "not slow"

simulate-demo: install
	$(BIN)/bssfp2dt-simulate demo/bids --subjects 2 --bssfp-sessions 1 --dwi-sessions 1 --seed 1 --overwrite

clean:
	rm -rf $(VENV) build *.egg-info bidsapp/*.egg-info .pytest_cache
