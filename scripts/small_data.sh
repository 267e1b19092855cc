#!/usr/bin/env bash
# The small-data recipes (configs/swav_small.yaml, configs/unmix_small.yaml) on small image folders, on a 2-core CPU,
# one queue per recipe, each training on one thread: Fashion-MNIST subsets of 4,000 and 8,000 training images (400 and 800 per
# class, seed 0) exported as PNG folders by scripts/export_imagefolder.py and trained through --dataset imagefolder,
# each scored on the whole 10,000-image test split (exported with it), and scikit-learn's digits (898 training
# images) as they ship. Every run and the raw pixels get the same evaluations: weighted kNN at k=20 and k=200 and
# k-means with 10 clusters (ACC, NMI, AMI, ARI).
#   bash scripts/small_data.sh            # all of it (each run's wall time: results/runs/small_data/*/train_wall_seconds)
#   OUT=runs/sd bash scripts/small_data.sh
#   FORCE=1 bash scripts/small_data.sh    # on a tree with uncommitted changes: the runs are then marked dirty
# It refuses to start on a working tree whose tracked files (outside results/, and results/published.csv) differ
# from the commit unless FORCE=1, and on an $OUT that is not empty. The exported folders and the full run
# directories stay in $OUT; results/runs/small_data/ is replaced by what the tables come from (per run config.yaml,
# train_log.jsonl, metrics.jsonl, output.log, train_wall_seconds; the pixel baselines' metrics.jsonl and output.log;
# provenance.json), and collect_results.py builds results/small_data/ (a table per dataset, curves) and
# results/small_data.md (both tables) from that copy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source scripts/lib/runs.sh
begin_study small_data

data_flags() {  # data_flags SUBSET: the flags naming data set SUBSET, into the array `data` (OUT may hold spaces)
  case $1 in
    digits) data=(--dataset digits) ;;
    *) data=(--dataset imagefolder --data_path "$OUT/data/$1") ;;
  esac
}
# The recipes' 120 epochs are sized for 4,000 images; the 8,000-image folder gets 90 (1.5 times their steps), what
# fits in 30 minutes of one thread.
# Digits gets what README advises for a folder under 1,000 images: epsilon 0.02 (the recipe's 0.03 collapses there)
# and 270 epochs (swav_small.yaml's header, try D).
declare -A TRAIN=([fm_4000]="" [fm_8000]="--epochs 90" [digits]="--epsilon 0.02 --epochs 270")
$PY scripts/export_imagefolder.py --dataset fashion_mnist --per_class 400 --seed 0 --out "$OUT/data/fm_4000"
$PY scripts/export_imagefolder.py --dataset fashion_mnist --per_class 800 --seed 0 --out "$OUT/data/fm_8000"

for subset in fm_4000 fm_8000 digits; do
  data_flags "$subset"
  evaluate --baseline pixels "${data[@]}" --output_dir "$OUT/pixels_$subset" > "$OUT/pixels_$subset.log" 2>&1
done

queue() {  # queue METHOD: its recipe on each data set in turn
  local method=$1 subset name data
  for subset in fm_4000 fm_8000 digits; do
    name=${method}_$subset
    data_flags "$subset"
    # shellcheck disable=SC2086  # the training flags are words
    timed "$name" $PY main_pretrain.py --config "configs/${method}_small.yaml" "${data[@]}" ${TRAIN[$subset]} \
      --output_dir "$OUT/$name" --device cpu
    evaluate --run "$OUT/$name" --skip_recorded true >> "$OUT/$name.log" 2>&1
  done
}

# One queue per method, side by side on the 2 cores.
queue swav & swav=$!
queue unmix & unmix=$!
wait_for_queues $swav $unmix
RUNS=()
for data in fm_4000 fm_8000 digits; do
  RUNS+=("swav_$data" "unmix_$data")
done

stage_keep "$KEEP"
for name in "${RUNS[@]}"; do
  keep_run "$name" "$STAGE/$name"
done
for data in fm_4000 fm_8000 digits; do
  keep_baseline "pixels_$data" "$STAGE/pixels_$data"
done
collect_staged --out "$STAGED_TABLES/small_data" --combined "$STAGED_TABLES/small_data.md" --published ''
replace_kept
