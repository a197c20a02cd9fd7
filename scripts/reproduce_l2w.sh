#!/usr/bin/env bash
# Reproduce docs/results.md, "L2W-DEN vs CONST, AdaLoss and IMTA-KD (issue 13)": budgeted
# accuracy of L2W-DEN (LeapLabTHU/L2W-DEN's meta step: two phases per batch, the sum of the
# exit groups' mean CE, its defaults: eps 0.8, constraint "mat", Adam 1e-4 following the
# cosine) against CONST, AdaLoss and IMTA's one-for-all distillation, all trained with the
# original's optimiser recipe (SGD momentum 0.9 without Nesterov, weight decay 1e-4, cosine
# LR from 0.1 per batch, batch 64) on real Fashion-MNIST: the same ResANN (width 16, 6
# exits), data (the first 15,000 training images, the 5,000-image validation split held out
# of them, the 10,000 test images), epochs and seeds (0, 1, 2). Then budgeted accuracy:
# thresholds calibrated on the validation split for each mean-FLOP budget, accuracy on the
# test split (scripts/budgeted_comparison.py). L2W-DEN makes two model updates per batch (one
# per half), so a control "const b32" trains CONST with batch 32: the same number of updates
# on the same number of images each. One run at a time, one thread each (small
# convolutions scale badly across threads when other processes load the CPU).
# Complete runs in the output directory are reused (delete it to start over).
#
#   bash scripts/reproduce_l2w.sh [OUT_DIR] [EPOCHS]     (defaults: runs/l2w-den, 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's ann_kernels, also for scripts/*.py
OUT="${1:-runs/l2w-den}"
EPOCHS="${2:-2}"
mkdir -p "$OUT"
start=$(date +%s)
OMP_NUM_THREADS=1 nice -n 10 "$PY" -m ann_kernels compare \
    --dataset fashion-mnist --model resann --num-exits 6 --model-arg width=16 --limit-train 15000 \
    --weightings const l2w adaloss imta_kd --seeds 0 1 2 \
    --epochs "$EPOCHS" --batch-size 64 --lr 0.1 --momentum 0.9 --no-nesterov --weight-decay 1e-4 \
    --channels-last --jobs 1 --out "$OUT"
OMP_NUM_THREADS=1 nice -n 10 "$PY" -m ann_kernels compare \
    --dataset fashion-mnist --model resann --num-exits 6 --model-arg width=16 --limit-train 15000 \
    --weightings const --seeds 0 1 2 \
    --epochs "$EPOCHS" --batch-size 32 --lr 0.1 --momentum 0.9 --no-nesterov --weight-decay 1e-4 \
    --channels-last --jobs 1 --out "$OUT/const-b32"
OMP_NUM_THREADS=1 nice -n 10 "$PY" scripts/budgeted_comparison.py "$OUT" --also "$OUT/const-b32" "const b32" \
    --budgets 0.3 0.4 0.5 0.6 0.8 1.0
echo "wall time: $(( $(date +%s) - start )) s" | tee "$OUT/wall_time.txt"
