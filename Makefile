# make help: list targets. The first `make train` or `make test` creates .venv and installs into it (torch pinned: on
# Linux PyPI's CUDA build, ~5.8 GB; TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU-only one; vimexp
# editable with its test extras); PY=python3 runs with an environment of yours instead.
VENV := .venv
PY ?= $(VENV)/bin/python
ENV := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.installed)
.PHONY: help install train test gpu-test gpu-prepare table1 table2 table3 table4 table5 table7 parity fig1 fig3 fig-speedup bench-train bench-train-hier bench-mixer bench-ddp bench-pipeline

help:  ## list targets
	@grep -E '^[a-z0-9 -]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install:  ## install into PY's environment: torch pinned (TORCH_INDEX: another wheel index), vimexp editable with test extras
	$(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev]"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(MAKE) install PY=$(PY)
	touch $@

train: $(ENV)  ## the main job: a small Vim on the built-in dataset (CPU, a few minutes)
	$(PY) -m vimexp.train

test: $(ENV)  ## the CPU test suite (what CI runs)
	$(PY) -m pytest -q -m "not gpu"

gpu-test:  ## on a CUDA machine: GPU tests (those against mamba-ssm skip without it; JSON in experiments/results/), then the fused kernels' tests natively
	$(PY) -m pytest -q -rP tests/test_gpu.py tests/test_cuda_graph.py tests/test_fused_mixer.py
	$(PY) -m pytest -q -rP -m gpu tests/test_distributed.py tests/test_device_augment.py

PRESET ?= builtin
TABLE_ARGS ?=
table1 table2 table3 table4 table5 table7: $(ENV)  ## a paper table: run its missing rows, render experiments/results/<table>_$(PRESET).md (PRESET=builtin|paper)
	$(PY) -m vimexp.tables $@ --preset $(PRESET) $(TABLE_ARGS)

parity: $(ENV)  ## rewrite docs/parity.md: Tables 1-3's settings, official vs the composed configs (experiments/parity.yaml)
	$(PY) -m vimexp.parity

fig1:  ## Figure 1 on the GPU: Vim-Ti vs DeiT-Ti inference throughput and memory vs resolution
	$(PY) -m vimexp.bench bench=fig1 $(BENCH_ARGS)

fig3:  ## Figures 3-4 on the GPU: the same with the simple feature pyramid of the dense tasks
	$(PY) -m vimexp.bench bench=fig3_4 $(BENCH_ARGS)

bench-train:  ## training throughput and memory at 224 px, Vim-Ti/S/B and DeiT-Ti/S/B
	$(PY) -m vimexp.bench bench=train $(BENCH_ARGS)

bench-train-hier:  ## training throughput and memory at 224 px, Hier-Vim-T/S/B and Swin-T/S/B (Table 7's models)
	$(PY) -m vimexp.bench bench=train_hier $(BENCH_ARGS)

bench-mixer:  ## the bimamba v2 mixer alone, fused Triton kernels vs mamba-ssm (BENCH_ARGS=bench.sweep=true: every block size)
	$(PY) -m vimexp.bench bench=mixer $(BENCH_ARGS)

bench-ddp:  ## on N GPUs of one host: DDP scaling (1, 2, 4 .. N), 1-vs-N equivalence, a DDP multirun, a killed rank resumed (Vim-S, 224 px)
	$(PY) -m vimexp.bench bench=ddp bench.devices=$(or $(DEVICES),2) bench.record=experiments/results/ddp.json $(BENCH_ARGS)

bench-pipeline:  ## the CLI on generated JPEGs against the model step alone (Vim-Ti/S; RandAugment in the workers, on the device, with the resize)
	$(PY) -m vimexp.bench bench=pipeline $(BENCH_ARGS)

fig-speedup:  ## redraw the README's speed-up figure from the kept H200 runs (experiments/results/fused_scan/h200/)
	$(PY) -m vimexp.bench bench=speedup out_dir=experiments/results/fused_scan/h200 $(BENCH_ARGS)

gpu-prepare:  ## here, before a device call: stage the kernel bundle and pytest into .device/
	bash ../shared/device/prepare.sh
	$(PY) -m pip download -q --no-deps -d .device/wheels pytest pluggy iniconfig pygments
