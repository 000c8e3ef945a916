#!/usr/bin/env bash
# The digits results of README.md ("Results"): SupCon and SimCLR (pretraining + linear evaluation)
# and the cross-entropy baseline at the same number of epochs, each with a small learning-rate
# search on a validation split carved from the training images (never the test split), then 3 seeds
# at the chosen rate on the full training set, evaluated on the test split; prints the table (mean
# ± std) and redraws the t-SNE figures in figures/. Resumable: finished runs are not run again.
# Options go to benchmarks/digits_results.py (its docstring and --help say what it does).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/digits_results.py "$@"
