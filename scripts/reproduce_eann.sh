#!/usr/bin/env bash
# Reproduce the EANN section of docs/results.md: a sequence of 3 ResANNs on Fashion-MNIST
# whose measured costs grow by ~2x (depth: num_exits 3 -> 6 -> 11, width 8), each trained
# 2 epochs on 15,000 training images with AnytimeLoss (member 0: SIEVE, members 1-2:
# EANN-SIEVE), then evaluated on the 10,000-image test split (early-exit thresholds
# calibrated on the 5,000-image validation split held out of the training set).
# Writes OUT/{member0,member1,member2}/, eann.json, evaluation.json, report.md and
# eann_anytime.png, rewrites the generated block (between the eann markers) of the EANN
# section of docs/results.md in place and copies the plot to docs/eann_anytime.png (64-colour
# PNG). The discussion below the block in docs/results.md is written by hand.
# About 12 CPU-minutes (measured: 20 min wall time of training on a 2-core CPU shared with
# two other training jobs, then 2-5 min of evaluation). Finished members are reused
# (--resume: a second run only re-evaluates); delete OUT_DIR to start over.
#
#   bash scripts/reproduce_eann.sh [OUT_DIR]       (default runs/eann)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-runs/eann}"
nice -n 10 "$PY" -m ann_kernels eann train \
    --dataset fashion-mnist --members 3 --growth 2 \
    --model resann --num-exits 3 --model-arg width=8 \
    --limit-train 15000 --epochs 2 --batch-size 128 --lr 0.1 --channels-last \
    --num-budgets 6 --no-progress --resume --out "$OUT" --results-md docs/results.md
"$PY" - "$OUT/eann_anytime.png" docs/eann_anytime.png <<'PYEOF'
import sys
from PIL import Image  # (a matplotlib dependency)
Image.open(sys.argv[1]).convert("RGB").quantize(colors=64).save(sys.argv[2], optimize=True)
print(f"wrote {sys.argv[2]}")
PYEOF
