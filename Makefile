# Every target is a thin call of the `kdcache` CLI; CONFIG picks the YAML (see configs/).
PYTHON ?= python3
CONFIG ?= configs/fashion-mnist.yaml
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test test-slow teacher cache-teacher bench demo clean-venv

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

bench: setup
	$(BIN)/python benchmarks/bench_stage1.py

demo: setup  ## the main job on the default data set (for now: stages 0 and 1)
	$(MAKE) --no-print-directory cache-teacher CONFIG=configs/demo.yaml

clean-venv:
	rm -rf $(VENV)
