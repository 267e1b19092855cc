#!/usr/bin/env bash
# make demo: SwAV on digits (CPU), its kNN and k-means evaluations, the same two on raw pixels, and the table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${DEMO_DIR:-runs/demo}
rm -rf "$OUT"
$PY main_pretrain.py --config configs/swav_digits.yaml --output_dir "$OUT/swav_digits" --device cpu
$PY eval_knn.py --run "$OUT/swav_digits" --device cpu
$PY eval_cluster.py --run "$OUT/swav_digits" --device cpu
$PY eval_knn.py --baseline pixels --dataset digits --output_dir "$OUT/pixels_digits"
$PY eval_cluster.py --baseline pixels --dataset digits --output_dir "$OUT/pixels_digits"
$PY collect_results.py --root "$OUT" --out "$OUT/results" --published ''
