#!/usr/bin/env bash
# The raw-pixel baselines of scripts/small_data.sh on both views: the images' own size (what small_data.sh scores
# pixels on) and the recipes' test view, the 20 px of their largest training crop (what small_data.sh scores the
# runs on: each 28 px Fashion-MNIST image, or 8 px digit, resized whole to 20 px). Same folders (Fashion-MNIST
# subsets of 400 and 800 images per class, seed 0, exported as PNG folders with the whole test split) and digits;
# kNN at k=20 and k=200 and k-means with as many clusters as classes. No training: a few minutes.
#   bash scripts/small_data_pixels.sh            # OUT=runs/small_data_pixels by default
# Same rules and records as scripts/small_data.sh: committed code only (FORCE=1 marks the records dirty), an empty
# $OUT, results/runs/small_data_pixels/ replaced by the records the tables come from, and the tables in
# results/small_data_pixels/ and results/small_data_pixels.md (the 20 px view a protocol of its own: eval_crop=20).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source scripts/lib/runs.sh
begin_study small_data_pixels

$PY scripts/export_imagefolder.py --dataset fashion_mnist --per_class 400 --seed 0 --out "$OUT/data/fm_4000"
$PY scripts/export_imagefolder.py --dataset fashion_mnist --per_class 800 --seed 0 --out "$OUT/data/fm_8000"

for subset in fm_4000 fm_8000 digits; do
  case $subset in
    digits) data=(--dataset digits) ;;
    *) data=(--dataset imagefolder --data_path "$OUT/data/$subset") ;;
  esac
  {
    evaluate --baseline pixels "${data[@]}" --output_dir "$OUT/pixels_$subset"
    evaluate --baseline pixels "${data[@]}" --output_dir "$OUT/pixels_$subset" --eval_crop 20
  } > "$OUT/pixels_$subset.log" 2>&1
done

stage_keep "$KEEP"
for subset in fm_4000 fm_8000 digits; do
  keep_baseline "pixels_$subset" "$STAGE/pixels_$subset"
done
collect_staged --out "$STAGED_TABLES/small_data_pixels" --combined "$STAGED_TABLES/small_data_pixels.md" --published ''
replace_kept
