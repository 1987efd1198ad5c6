# Every target is a thin call of the `kdcache` CLI; CONFIG picks the YAML (see configs/).
PYTHON ?= python3
CONFIG ?= configs/fashion-mnist.yaml
TRAIN_CONFIG ?= configs/train/fashion-mnist/kd.yaml
GRID ?= configs/grid/fashion-mnist.yaml
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test test-slow teacher cache-teacher train bench demo clean-venv

setup: $(STAMP) $(FMNIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(FMNIST):
	$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist

test: setup  ## the fast suite (tiny data); the few long end-to-end tests are `make test-slow`
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

teacher: setup  ## stage 0: train the config's teacher (a bootstrap when you have no checkpoint)
	$(BIN)/kdcache train-teacher --config $(CONFIG)

cache-teacher: setup  ## stage 1: cache the teacher's logits (builds the teacher first when its checkpoint is missing)
	@ckpt="$$($(BIN)/kdcache config --config $(CONFIG) teacher.checkpoint)"; \
	[ -f "$$ckpt" ] || $(MAKE) --no-print-directory teacher CONFIG=$(CONFIG)
	$(BIN)/kdcache cache-teacher --config $(CONFIG)

.PHONY: stats
stats: setup  ## stage 2: per-(sample, view) temperatures and statistics of the config's store (Dask)
	$(BIN)/kdcache stats --config $(CONFIG)

train: setup  ## stage 3: one student against the cached targets (TRAIN_CONFIG: configs/train/...; resumes)
	$(BIN)/kdcache train --config $(TRAIN_CONFIG)

.PHONY: grid
grid: setup  ## stage 3 many times: GRID's methods x students x hyper-parameters x seeds on dask (resumes)
	$(BIN)/kdcache grid $(GRID)

bench: setup
	$(BIN)/python benchmarks/bench_stage1.py
	$(BIN)/python benchmarks/bench_stage2.py
	$(BIN)/python benchmarks/bench_stage3.py
	$(BIN)/python benchmarks/bench_grid.py
	$(BIN)/python benchmarks/bench_topk.py

demo: setup  ## everything on a Fashion-MNIST subset: teacher, cache, statistics, every method, the table and plots
	$(MAKE) --no-print-directory cache-teacher CONFIG=configs/demo.yaml
	$(BIN)/kdcache stats --config configs/demo.yaml
	$(BIN)/kdcache grid configs/grid/demo.yaml
	@echo "demo: shrunk to minutes (10000 training images, teacher 4 epochs, 4 views, students 3 epochs, one seed):"
	@echo "the full configuration is configs/fashion-mnist.yaml + configs/grid/fashion-mnist.yaml (make grid)."

clean-venv:
	rm -rf $(VENV)
