# make help: list targets
PY ?= python
.PHONY: help install train test gpu-test gpu-prepare clean-logs

help:  ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install:  ## set up: CPU torch pinned, vimexp editable with test extras
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev]"

train:  ## the main job: a small Vim on the built-in dataset (CPU, a few minutes)
	$(PY) -m vimexp.train

test:  ## the CPU test suite (what CI runs)
	$(PY) -m pytest -q -m "not gpu"

gpu-test:  ## on a CUDA machine with mamba-ssm: GPU tests, cuda-vs-torch comparison JSON in experiments/results/
	$(PY) -m pytest -q -m gpu tests/test_gpu.py

clean-logs:  ## remove run directories
	rm -rf logs

gpu-prepare:  ## here, before a device call: stage the kernel bundle and pytest into .device/
	bash ../shared/device/prepare.sh
	$(PY) -m pip download -q --no-deps -d .device/wheels pytest pluggy iniconfig pygments
