#!/usr/bin/env bash
# Reproduce docs/results.md's AdaLoss section on Fashion-MNIST (issue 13): the reference
# AdaLoss (the original's defaults) vs CONST vs OPT (trained at the final exit only) on the
# demo's ResANN (6 exits, width 16), and the small-vs-large claim with a width-8 ResANN
# (CONST and AdaLoss); 3 seeds each. Recipe as the original code trains: SGD momentum 0.9
# without Nesterov, weight decay 1e-4 on conv and FC weights only (FC decay times the exit's
# static weight, no decay on BN: --weight-decay-mode reference), here with a per-step cosine
# LR from 0.1 and batch 128, 12 epochs over the first 15,000 training images (5,000 held
# out for validation); accuracy on the first 5,000 test images.
# Two runs train side by side (1 thread each). The CPU time of everything (user + sys,
# worker processes included) is printed at the end and written to OUT/cpu_time.txt.
# Runs already complete with the same settings in OUT are reused (delete OUT to start over).
#
#   bash scripts/reproduce_results.sh [OUT_DIR]       (default runs/results)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-runs/results}"
COMMON=(--dataset fashion-mnist --model resann --num-exits 6
        --limit-train 15000 --limit-eval 5000 --seeds 0 1 2
        --epochs 12 --batch-size 128 --lr 0.1 --no-nesterov
        --weight-decay 1e-4 --weight-decay-mode reference --channels-last --jobs 2)
mkdir -p "$OUT"
TIMEFORMAT='%R %U %S'
{ time {
    nice -n 10 "$PY" -m ann_kernels compare "${COMMON[@]}" --model-arg width=16 \
        --weightings const adaloss opt --out "$OUT/width16" 2>&3
    nice -n 10 "$PY" -m ann_kernels compare "${COMMON[@]}" --model-arg width=8 \
        --weightings const adaloss --out "$OUT/width8" 2>&3
} ; } 3>&2 2> "$OUT/time.raw"
read -r REAL USER SYS < <(tail -n 1 "$OUT/time.raw")
echo "wall ${REAL} s, CPU user ${USER} s + sys ${SYS} s" | tee "$OUT/cpu_time.txt"
"$PY" scripts/plot_results.py "$OUT" --png docs/adaloss_vs_const.png
