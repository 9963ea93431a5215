# bssfp2dt: every task a developer or CI runs. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; a CUDA machine may override it: make install TORCH_SPEC="torch==2.13.0"
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: help install lint test test-fast demo benchmarks default-model clean

DEMO := demo

help:
	@echo "make demo      install, simulate a 2-subject dataset in $(DEMO)/bids and run bssfp2dt on it"
	@echo "make test      install, lint (ruff) and run the test suite (what CI runs)"
	@echo "make lint      only the linter (ruff check)"
	@echo "make install   create $(VENV) and install bssfp2dt with its test dependencies"
	@echo "make benchmarks  run the speed/memory benchmarks (minutes; results go in the README)"
	@echo "make default-model  retrain the packaged default models on simulated data (seeded)"

$(STAMP): pyproject.toml version
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

LINTED := bidsapp tests scripts benchmarks

lint: install
	$(BIN)/ruff check $(LINTED)

test: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

test-fast: install
	$(BIN)/python -m pytest -q -x -m "not slow"

# The demo data match the packaged models' training data (simulated, raw voxels x1.5); the simulator models
# neither Gibbs ringing nor motion within a scan, so those two preprocessing steps are skipped.
DEMO_FLAGS := --unringing-method none --hmc-model none --nprocs 2 --omp-nthreads 2

demo: install
	$(BIN)/bssfp2dt-simulate $(DEMO)/bids --subjects 2 --bssfp-sessions 1 --dwi-sessions 1 --seed 7 \
		--voxel-scale 1.5 --overwrite --no-progress
	$(BIN)/bssfp2dt $(DEMO)/bids $(DEMO)/out participant -w $(DEMO)/work $(DEMO_FLAGS)
	$(BIN)/bssfp2dt $(DEMO)/bids $(DEMO)/out group
	@echo "demo: input $(DEMO)/bids (truth in $(DEMO)/bids/derivatives/bssfp2dt-truth)"
	@echo "demo: maps in $(DEMO)/out/sub-*/ses-1/dwi, reports $(DEMO)/out/sub-01.html and $(DEMO)/out/group/group_report.html"

default-model: install
	$(BIN)/python scripts/train_default_model.py

benchmarks: install
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info bidsapp/*.egg-info .pytest_cache
