#!/usr/bin/env bash
# One command on a CUDA machine: build with CUDA for the present GPU, run the CUDA tests and the
# GPU benchmarks, write CSV + PNG + summary.md into $GPU_CHECK_OUT (default gpu-check/).
# Under 8 minutes on an H100-class GPU; no network, no downloads: it uses the preinstalled
# torch (>= 2.11), pytest, hypothesis, triton, ninja. Phases, time limits and the exit status:
# scripts/gpu_check.py (its docstring).
#
#   scripts/gpu_check.sh              # or: make gpu-check
#   scripts/gpu_check.sh --dry-run    # list the phases, check syntax and imports (no GPU needed)
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
