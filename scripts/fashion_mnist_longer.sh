#!/usr/bin/env bash
# Longer runs of two Fashion-MNIST recipes, to see how far more epochs move them on a 2-core CPU: Un-Mix on SwAV
# (configs/unmix_fashion_mnist.yaml, 10 epochs in scripts/fashion_mnist.sh) for 50 epochs, and NPID
# (configs/npid_fashion_mnist_20ep.yaml) for 40 epochs with its learning-rate drops moved to epochs 24 and 32 (60 %
# and 80 % of the run, as in the 20-epoch recipe), both with --channels_last (the faster convolutions of
# bench/RESULTS.md; the same arithmetic up to float rounding). Two queues of one thread side by side, about an hour on
# the project's 2-core machine (bench/RESULTS.md has the measured time); each run scored like
# scripts/fashion_mnist.sh scores it (kNN at k=200 and k=20, k-means with 10 clusters), raw pixels by the same code.
#   bash scripts/fashion_mnist_longer.sh            # OUT=runs/fashion_mnist_longer by default
# Same rules and records as scripts/fashion_mnist.sh: committed code only (FORCE=1 marks the runs dirty), an empty
# $OUT, results/runs/fashion_mnist_longer/ replaced by the records the tables come from, and the tables and curves
# in results/fashion_mnist_longer/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source scripts/lib/runs.sh
begin_study fashion_mnist_longer

queue_unmix() {
  timed unmix $PY main_pretrain.py --config configs/unmix_fashion_mnist.yaml --epochs 50 --channels_last \
    --output_dir "$OUT/unmix" --device cpu
  evaluate_run "$OUT/unmix" >> "$OUT/unmix.log" 2>&1
}

queue_npid() {
  timed npid $PY main_pretrain.py --config configs/npid_fashion_mnist_20ep.yaml --epochs 40 --lr_drops 24 32 \
    --channels_last --output_dir "$OUT/npid" --device cpu
  evaluate_run "$OUT/npid" --features embedding >> "$OUT/npid.log" 2>&1
  evaluate_pixels fashion_mnist > "$OUT/pixels.log" 2>&1
}

queue_unmix & a=$!
queue_npid & b=$!
wait_for_queues $a $b

keep_runs_and_pixels unmix npid
