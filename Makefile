# feclip: common tasks. `make help` lists them.
PYTHON ?= python3

.PHONY: help install test test-all lint format demo reproduce-table reproduce-study sweep report bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 18

install:  ## install feclip with the dev extras (torch/torchvision pinned to the local pair)
	$(PYTHON) -m pip install -e '.[dev]'

test:  ## run the CPU test suite (tiny random CLIP, synthetic data; no network, no weights)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not gpu and not weights"

test-all:  ## every test, including those that need a GPU or real CLIP weights
	$(PYTHON) -m pytest -q

lint:  ## ruff lint + format check
	$(PYTHON) -m ruff check feclip tests scripts
	$(PYTHON) -m ruff format --check feclip tests scripts

format:  ## ruff format in place
	$(PYTHON) -m ruff format feclip tests scripts

demo:  ## train + evaluate on the embedded synthetic data (feclip-train +experiment=demo)
	feclip-train +experiment=demo

reproduce-table:  ## paper protocol, 5 seeds, paper-vs-ours table (DATA_ROOT=...)
	@echo "make reproduce-table: not available yet (needs the sweep/report issue)"; exit 1

reproduce-study:  ## the earlier study's spread3-vs-last4 benchmark (DATA_ROOT=...)
	@echo "make reproduce-study: not available yet (needs the sweep/report issue)"; exit 1

sweep:  ## run an experiment sweep: make sweep EXP=taps
	@echo "make sweep: not available yet (needs the sweep/report issue)"; exit 1

report:  ## aggregate a results tree: make report RESULTS=results/taps
	@echo "make report: not available yet (needs the sweep/report issue)"; exit 1

bench:  ## side-by-side speed ratios on this CPU; last line is JSON
	$(PYTHON) scripts/bench.py
