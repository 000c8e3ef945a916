#!/usr/bin/env bash
# SupCon with and without --moco (--moco_k 1024, --moco_m 0.99 and 0.999) on digits at batch 16:
# the same pretraining epochs and learning-rate search (seed 0, --val_split 0.2) for each, then
# 3 seeds at each chosen rate, linear top-1 on the test split and the time per epoch; one thread
# per process, runs round-robin over the configurations. Logs, checkpoints, results.md and
# results.json under save/moco_digits/; runs already done are skipped, so it can be rerun.
# Options go to benchmarks/moco_digits.py, e.g. --epochs 4 --linear_epochs 5 --lrs 0.05 --jobs 1.
# Run from anywhere; see benchmarks/README.md, "MoCo on small batches (digits)".
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
exec python benchmarks/moco_digits.py "$@"
