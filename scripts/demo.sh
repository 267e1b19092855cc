#!/usr/bin/env bash
# make demo: SwAV on digits (CPU), its kNN and k-means evaluations, the same two on raw pixels, and the table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if ! [ -x "${PY%% *}" ] && ! command -v "${PY%% *}" > /dev/null; then
  echo "demo.sh: no python at '$PY': run 'make setup' first (or 'make demo', which does), or give PY=..." >&2
  exit 2
fi
OUT=${DEMO_DIR:-runs/demo}
# A new demo replaces the last one's folders only: a DEMO_DIR that holds anything else is refused, not removed.
if [ -e "$OUT" ]; then
  for entry in "$OUT"/* "$OUT"/.[!.]*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case ${entry##*/} in
      swav_digits|pixels_digits|results) ;;
      *) echo "demo.sh: DEMO_DIR '$OUT' holds '${entry##*/}', which no demo wrote: give a new or empty folder" >&2
         exit 2 ;;
    esac
  done
  rm -rf "$OUT/swav_digits" "$OUT/pixels_digits" "$OUT/results"
fi
$PY main_pretrain.py --config configs/swav_digits.yaml --output_dir "$OUT/swav_digits" --device cpu
$PY eval_knn.py --run "$OUT/swav_digits" --device cpu
$PY eval_cluster.py --run "$OUT/swav_digits" --device cpu
$PY eval_knn.py --baseline pixels --dataset digits --output_dir "$OUT/pixels_digits" --device cpu
$PY eval_cluster.py --baseline pixels --dataset digits --output_dir "$OUT/pixels_digits" --device cpu
$PY collect_results.py --root "$OUT" --out "$OUT/results" --published ''
