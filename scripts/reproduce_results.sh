#!/usr/bin/env bash
# Reproduce docs/results.md: CONST vs AdaLoss on Fashion-MNIST, the demo's ResANN and
# budget (full 55,000-image training split, 3 epochs, SGD + Nesterov, cosine LR), 3 seeds.
# Two runs train side by side (1 thread each); 11 CPU-minutes in all (measured), so about
# 6-7 minutes on a quiet 2-core CPU (23 minutes at nice 10 on a busy one).
# Runs already complete in the output directory are reused (delete it to start over).
#
#   bash scripts/reproduce_results.sh [OUT_DIR]       (default runs/results)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-runs/results}"
exec nice -n 10 "$PY" -m ann_kernels compare \
    --dataset fashion-mnist --model resann --num-exits 6 --model-arg width=16 \
    --weightings const adaloss --seeds 0 1 2 \
    --epochs 3 --batch-size 128 --lr 0.1 --channels-last \
    --jobs 2 --out "$OUT"
