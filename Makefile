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
	$(PYTHON) -m ruff check feclip hydra_plugins tests scripts
	$(PYTHON) -m ruff format --check feclip hydra_plugins tests scripts

format:  ## ruff format in place
	$(PYTHON) -m ruff format feclip hydra_plugins tests scripts

demo:  ## train + evaluate on the embedded synthetic data (feclip-train +experiment=demo)
	feclip-train +experiment=demo

reproduce-table:  ## paper protocol (Tables 1-2), 5 seeds, paper-vs-ours table: make reproduce-table DATA_ROOT=...
	@test -n "$(DATA_ROOT)" || { echo "make reproduce-table: set DATA_ROOT=/path/to/datasets (see docs/datasets.md)"; exit 2; }
	$(PYTHON) scripts/check_datasets.py --data-root "$(DATA_ROOT)" mvtec_to_all visa_to_mvtec
	DATA_ROOT="$(DATA_ROOT)" feclip-train -m +experiment=benchmark $(ARGS)
	feclip-report results/benchmark --out results/tables/benchmark
	cp results/tables/benchmark/summary.md results/tables/paper_vs_ours.md
	@echo "wrote results/tables/paper_vs_ours.md"

reproduce-study:  ## the earlier study's spread3-vs-last4 benchmark (MVTec AD, VisA, BTAD), 5 seeds
	@test -n "$(DATA_ROOT)" || { echo "make reproduce-study: set DATA_ROOT=/path/to/datasets (see docs/datasets.md)"; exit 2; }
	$(PYTHON) scripts/check_datasets.py --data-root "$(DATA_ROOT)" visa_to_mvtec study3
	DATA_ROOT="$(DATA_ROOT)" feclip-train -m +experiment=benchmark_taps $(ARGS)
	feclip-report results/benchmark_taps --out results/tables/benchmark_taps --study-numbers feclip/report/paper/study_numbers.csv
	cp results/tables/benchmark_taps/summary.md results/tables/study_vs_ours.md
	@echo "wrote results/tables/study_vs_ours.md"

sweep:  ## run a study's sweep: make sweep EXP=taps [ARGS="hydra/launcher=slurm"]
	@test -n "$(EXP)" || { echo "make sweep: name the study, e.g. make sweep EXP=taps (feclip/conf/experiment/)"; exit 2; }
	feclip-train -m +experiment=$(EXP) $(ARGS)

report:  ## aggregate a results tree: make report RESULTS=results/taps
	@test -n "$(RESULTS)" || { echo "make report: name the results tree, e.g. make report RESULTS=results/taps"; exit 2; }
	feclip-report $(RESULTS)

bench:  ## side-by-side speed ratios on this CPU; last line is JSON
	$(PYTHON) scripts/bench.py
