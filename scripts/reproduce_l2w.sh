#!/usr/bin/env bash
# Reproduce docs/results.md, "L2W-DEN and the other training recipes (issue 6)": CONST,
# AdaLoss, L2W-DEN and IMTA's one-for-all knowledge distillation on real
# Fashion-MNIST; the same ResANN (width 16, 6 exits), data (15,000 training images, the
# 5,000-image validation split, the 10,000 test images), budget (2 epochs, SGD + Nesterov,
# cosine LR 0.1, batch 128) and seeds (0, 1). Then budgeted accuracy: thresholds
# calibrated on the validation split for each mean-FLOP budget, accuracy on the test split.
# One run at a time, one thread (small convolutions scale badly across threads when other
# processes load the CPU); about 9 minutes here (7.5 of training, 1 of calibration).
# Complete runs in the output directory are reused (delete it to start over).
#
#   bash scripts/reproduce_l2w.sh [OUT_DIR]       (default runs/l2w)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-runs/l2w}"
OMP_NUM_THREADS=1 nice -n 10 "$PY" -m ann_kernels compare \
    --dataset fashion-mnist --model resann --num-exits 6 --model-arg width=16 --limit-train 15000 \
    --weightings const l2w adaloss imta_kd --seeds 0 1 \
    --epochs 2 --batch-size 128 --lr 0.1 --channels-last \
    --jobs 1 --out "$OUT"
nice -n 10 "$PY" scripts/budgeted_comparison.py "$OUT" --budgets 0.3 0.4 0.5 0.6 0.8 1.0
