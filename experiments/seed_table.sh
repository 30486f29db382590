#!/usr/bin/env bash
# The README's results table: the four seed configs, 5 epochs, full MNIST, seeds 0 and 1 (override with SEEDS="0 1 2").
set -euo pipefail
cd "$(dirname "$0")/.."
for seed in ${SEEDS:-0 1}; do
  for config in no_tricks batchnorm layernorm all_tricks; do
    python -m cookbook train --config "$config" --seed "$seed" --epochs 5 --experiment "${EXPERIMENT:-seed-table}" "$@"
  done
done
