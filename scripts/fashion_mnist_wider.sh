#!/usr/bin/env bash
# Two tries at a higher kNN on full Fashion-MNIST for the same hour of one CPU thread as the 50-epoch Un-Mix run of
# scripts/fashion_mnist_longer.sh, which gains little from its last 40 epochs: more width, or more views.
#   unmix_w12     configs/unmix_fashion_mnist.yaml at width 12 (2.25x the convolutions' work) for 25 epochs
#   swav_multicrop configs/swav_fashion_mnist.yaml plus 4 crops of 12 px (scale 0.1-0.4, as configs/swav_small.yaml)
#                 for 36 epochs (Un-Mix's mixtures take two crops only)
# Both with --channels_last, side by side, one thread each, scored like scripts/fashion_mnist.sh scores a run (kNN at
# k=200 and k=20, k-means with 10 clusters), raw pixels by the same code.
#   bash scripts/fashion_mnist_wider.sh            # OUT=runs/fashion_mnist_wider by default
# Same rules and records as scripts/fashion_mnist.sh: committed code only (FORCE=1 marks the runs dirty), an empty
# $OUT, results/runs/fashion_mnist_wider/ replaced by the records the tables come from, and the tables and curves in
# results/fashion_mnist_wider/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source scripts/lib/runs.sh
begin_study fashion_mnist_wider

queue_unmix() {
  timed unmix_w12 $PY main_pretrain.py --config configs/unmix_fashion_mnist.yaml --width 12 --epochs 25 \
    --channels_last --output_dir "$OUT/unmix_w12" --device cpu
  evaluate_run "$OUT/unmix_w12" >> "$OUT/unmix_w12.log" 2>&1
}

queue_swav() {
  timed swav_multicrop $PY main_pretrain.py --config configs/swav_fashion_mnist.yaml --nmb_crops 2 4 \
    --size_crops 20 12 --min_scale_crops 0.3 0.1 --max_scale_crops 1.0 0.4 --epochs 36 --channels_last \
    --output_dir "$OUT/swav_multicrop" --device cpu
  evaluate_run "$OUT/swav_multicrop" >> "$OUT/swav_multicrop.log" 2>&1
  evaluate_pixels fashion_mnist > "$OUT/pixels.log" 2>&1
}

queue_unmix & a=$!
queue_swav & b=$!
wait_for_queues $a $b

keep_runs_and_pixels unmix_w12 swav_multicrop
