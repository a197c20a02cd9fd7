# One-command set-up on a fresh machine (Debian, Python 3.11, no GPU):
#   make demo   -> venv + deps + C++ extension + Fashion-MNIST, then the main job
#   make test   -> venv + deps + C++ extension, then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DATA   := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CSRC   := $(shell find csrc -type f 2>/dev/null) setup.py

.PHONY: setup build data demo test bench clean gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is the CPU wheel that lies on this machine's disk; an unpinned torch
# would pull a multi-GB CUDA build. Install it only when the venv has no torch yet.
# kserve 0.21 (its V2 REST client is a test oracle) needs protobuf < 7; ray[serve]'s unbounded
# grpcio-reflection needs protobuf >= 7 from 1.82 on, so it is held below 1.82 (also in a venv
# made before these pins, where pip would otherwise keep a newer one).
$(VENV)/.deps: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q setuptools wheel numpy pybind11 ninja tqdm matplotlib pytest hypothesis triton tokenizers \
		fastapi uvicorn prometheus_client transformers openai 'tritonclient[http]' 'ray[serve]' \
		kserve==0.21.0 'protobuf>=6.33.5,<7' 'grpcio-reflection<1.82'
	touch $@

# --no-build-isolation: compile against the torch installed above.
$(VENV)/.built: $(VENV)/.deps $(CSRC)
	flock /tmp/ann_kernels_build.lock $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

setup build: $(VENV)/.built

$(DATA):
	apt-get update -q && apt-get install -y -q dataset-fashion-mnist

data: $(DATA)

demo: build data
	$(PY) -m ann_kernels demo

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) bench/bench_multi_exit_ce.py

# On a CUDA machine, with its own preinstalled torch (no venv, no downloads): build with CUDA
# for the present GPU, the CUDA tests, the GPU targets, the quick benchmarks -> $$GPU_CHECK_OUT
# (gpu-check/summary.md). GPU_CHECK_ARGS=--full: every slow test; --dry-run: the rehearsal.
# docs/gpu.md.
gpu-check:
	PYTHON=$(PYTHON) scripts/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info ann_kernels/_C*.so $(VENV)
