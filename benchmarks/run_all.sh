#!/usr/bin/env bash
# Runs every benchmark at full size, one after the other, and keeps what each printed in
# benchmarks/results/<name>.txt (the README's figures are copied from these files).
# The script arguments go to the step-time benchmarks only; oneshot.py reads JAXPRUNE_CACHE
# (dense MNIST models) and trains them when absent.
# Run it on a quiet machine: the scripts time work side by side, but a loaded CPU still skews them.
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p results
for name in selection hessian structured sharded; do
  echo "== $name"
  python "$name.py" "$@" 2>&1 | tee "results/$name.txt"
done
echo "== step"
python step.py --reps 15 "$@" 2>&1 | tee results/step.txt
echo "== step variants"
python step.py --score taylor --scope global "$@" 2>&1 | tee results/step_taylor_global.txt
python step.py --batch 2048 --reps 3 "$@" 2>&1 | tee results/step_batch2048.txt
python step.py --compare-scores --reps 9 "$@" 2>&1 | tee results/step_scores.txt
echo "== solvers"
python solvers.py 2>&1 | tee results/solvers.txt
echo "== oneshot (real MNIST; trains and caches the dense models first)"
python oneshot.py --sparsities 0.5,0.8,0.9,0.95 2>&1 | tee results/oneshot.txt
