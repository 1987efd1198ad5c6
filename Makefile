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

.PHONY: setup test test-slow teacher cache-teacher train bench demo views-experiment clean-venv

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
	$(BIN)/kdcache cache-teacher --config configs/frontier/fmnist.yaml && OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_frontier.py
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_reader.py

demo: setup  ## one teacher pass, every method on a small student, the table, the saving and plots (~7 min)
	@[ -f checkpoints/demo/fmnist_resnet.pt ] || $(BIN)/kdcache train-teacher --config configs/fashion-mnist.yaml \
		--checkpoint checkpoints/demo/fmnist_resnet.pt --epochs 3
	@start=$$(date +%s); $(BIN)/kdcache cache-teacher --config configs/demo.yaml && \
		echo "stage 1 (the one teacher pass every offline run below reads): $$(( $$(date +%s) - start )) s"
	$(BIN)/kdcache stats --config configs/demo.yaml
	$(BIN)/kdcache grid configs/grid/demo.yaml
	@echo "demo: teacher fmnist_resnet trained on all 60000 images (3 epochs); students learn from 2000 images, 40 epochs,"
	@echo "2 seeds; ce_fresh / kd_online_fresh draw a fresh view every step, the rest read the 8 cached views."

views-experiment: setup  ## docs/RESULTS.md's views experiment: 3 stores, 78 runs, the table and plot (~30 min; resumable)
	$(BIN)/kdcache cache-teacher --config configs/views/crop_flip.yaml
	$(BIN)/kdcache stats --config configs/views/crop_flip.yaml --stat wttm_power_sum
	$(BIN)/kdcache cache-teacher --config configs/views/resized.yaml
	$(BIN)/kdcache cache-teacher --config configs/views/resized-cropflip-teacher.yaml
	OMP_NUM_THREADS=1 $(BIN)/kdcache grid configs/grid/views/crop_flip.yaml --workers 2
	OMP_NUM_THREADS=1 $(BIN)/kdcache grid configs/grid/views/resized.yaml --workers 2
	OMP_NUM_THREADS=1 $(BIN)/kdcache grid configs/grid/views/resized-cropflip-teacher.yaml --workers 2
	$(BIN)/python benchmarks/views_report.py results/views

clean-venv:
	rm -rf $(VENV)
