#!/usr/bin/env bash
# One command on a CUDA machine: build with CUDA for the present GPU, check every CUDA kernel
# registered, run the CUDA tests (one process per test file), judge the GPU targets of
# bench/README.md, then the quick benchmarks while time remains; CSV + PNG + summary.md into
# $GPU_CHECK_OUT (default gpu-check/). 540 s by default (the device machine's 10-minute
# command limit, with room to spare); no network, no downloads: it uses the preinstalled torch
# (>= 2.11), triton, numpy, pytest, hypothesis, tqdm, setuptools, ninja. Phases, limits and the
# exit status: scripts/gpu_check.py (its docstring) and docs/gpu.md.
#
#   scripts/gpu_check.sh              # or: make gpu-check
#   scripts/gpu_check.sh --full       # every slow CUDA test (default: sampled)
#   scripts/gpu_check.sh --dry-run    # the whole plan rehearsed here, the CPU standing in
#   GPU_CHECK_OUT=/tmp/out PYTHON=/opt/venv/bin/python scripts/gpu_check.sh --budget 400
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "gpu_check: $PYTHON cannot import torch; set PYTHON=/path/to/python of the preinstalled torch" >&2
  exit 2
fi
cd "$ROOT"
exec "$PYTHON" "$ROOT/scripts/gpu_check.py" "$@"
