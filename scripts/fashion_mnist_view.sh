#!/usr/bin/env bash
# The test view a Fashion-MNIST run is scored on. The recipes train 20 px crops of the 28 px images, and a run is
# scored, as upstream scores on its training crop size, on its largest training crop: each 28 px image resized to
# 20 px. This script trains the 10-epoch SwAV and Un-Mix recipes (scripts/fashion_mnist.sh's, one thread each, side
# by side) and scores each run twice, on that 20 px view and on the images' own 28 px (--eval_crop 28: kNN at k=200
# and k=20, k-means with 10 clusters), and raw pixels by the same code on both views.
#   bash scripts/fashion_mnist_view.sh            # OUT=runs/fashion_mnist_view by default; about 30 minutes
# Same rules and records as scripts/fashion_mnist.sh: committed code only (FORCE=1 marks the runs dirty), an empty
# $OUT, results/runs/fashion_mnist_view/ replaced by the records the tables come from, and the tables and curves in
# results/fashion_mnist_view/ (each view a protocol of its own: eval_crop=28, eval_crop=20 for pixels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source scripts/lib/runs.sh
begin_study fashion_mnist_view

train_and_score_both_views() {  # train_and_score_both_views NAME: configs/NAME_fashion_mnist.yaml, on 20 and 28 px
  local name=$1
  timed "$name" $PY main_pretrain.py --config "configs/${name}_fashion_mnist.yaml" --output_dir "$OUT/$name" \
    --device cpu
  {
    evaluate_run "$OUT/$name"
    $PY eval_knn.py --run "$OUT/$name" --device cpu --skip_recorded true --k 200 20 --eval_crop 28
    $PY eval_cluster.py --run "$OUT/$name" --device cpu --skip_recorded true --eval_crop 28
  } >> "$OUT/$name.log" 2>&1
}

score_pixels_both_views() {  # the images' 28 px (evaluate_pixels), then resized to 20 px as a run's test view is
  evaluate_pixels fashion_mnist
  evaluate_pixels fashion_mnist --eval_crop 20
}

{ train_and_score_both_views swav; } & a=$!
{ train_and_score_both_views unmix; score_pixels_both_views > "$OUT/pixels.log" 2>&1; } & b=$!
wait_for_queues $a $b

keep_runs_and_pixels swav unmix
