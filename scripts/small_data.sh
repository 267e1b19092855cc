#!/usr/bin/env bash
# The small-data recipes (configs/swav_small.yaml, configs/unmix_small.yaml) on small image folders, on a 2-core CPU,
# one training at a time on one thread: Fashion-MNIST subsets of 4,000 and 8,000 training images (400 and 800 per
# class, seed 0) exported as PNG folders by scripts/export_imagefolder.py and trained through --dataset imagefolder,
# each scored on the whole 10,000-image test split (exported with it), and scikit-learn's digits (898 training
# images) as they ship. Every run and the raw pixels get the same evaluations: weighted kNN at k=20 and k=200 and
# k-means with 10 clusters (ACC, NMI, AMI, ARI).
#   bash scripts/small_data.sh            # all of it (each run's wall time: results/runs/small_data/*/train_wall_seconds)
#   OUT=runs/sd bash scripts/small_data.sh
#   FORCE=1 bash scripts/small_data.sh    # on a tree with uncommitted changes: the runs are then marked dirty
# It refuses to start on a working tree whose tracked files differ from the commit unless FORCE=1, and on an $OUT
# that is not empty. The exported folders and the full run directories stay in $OUT; results/runs/small_data/ is
# replaced by what the tables come from (per run config.yaml, train_log.jsonl, metrics.jsonl, output.log,
# train_wall_seconds; the pixel baselines' metrics.jsonl and output.log; provenance.json), and collect_results.py
# builds results/small_data/ (a table per dataset, curves) and results/small_data.md (both tables) from that copy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/small_data}
KEEP=results/runs/small_data
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

fail() {
  echo "small_data.sh: error: $1" >&2
  exit 2
}
commit=$(git rev-parse HEAD 2>/dev/null) || fail "not a git checkout: the results could not name their code"
changed=$(git status --porcelain --untracked-files=no)
dirty=false
if [ -n "$changed" ]; then
  [ "${FORCE:-0}" = 1 ] || fail "$(echo "$changed" | wc -l) tracked file(s) differ from commit ${commit:0:12} \
(git status): commit them, or FORCE=1 to run anyway with the runs marked dirty"
  dirty=true
fi
if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  fail "OUT=$OUT is not empty: remove it or choose another OUT (its runs would resume, made by other code)"
fi
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
mkdir -p "$OUT"

timed() {  # timed NAME COMMAND...: run, and note its wall time in $OUT/NAME.time
  local name=$1 start=$SECONDS
  shift
  "$@" > "$OUT/$name.log" 2>&1
  echo "$((SECONDS - start))" > "$OUT/$name.time"
}

evaluate() {  # evaluate RUN_OR_BASELINE_FLAGS...: kNN at k=20 and k=200, k-means with as many clusters as classes
  $PY eval_knn.py --device cpu --k 20 "$@"
  $PY eval_knn.py --device cpu --k 200 "$@"
  $PY eval_cluster.py --device cpu "$@"
}

# name: the data flags of each set
declare -A DATA=([fm_4000]="--dataset imagefolder --data_path $OUT/data/fm_4000"
                 [fm_8000]="--dataset imagefolder --data_path $OUT/data/fm_8000"
                 [digits]="--dataset digits")
# The recipes' 60 epochs are sized for 4,000 images; the 8,000-image folder keeps their number of steps (and cost).
declare -A TRAIN=([fm_4000]="" [fm_8000]="--epochs 30" [digits]="")
$PY scripts/export_imagefolder.py --dataset fashion_mnist --per_class 400 --seed 0 --out "$OUT/data/fm_4000"
$PY scripts/export_imagefolder.py --dataset fashion_mnist --per_class 800 --seed 0 --out "$OUT/data/fm_8000"

RUNS=()
for data in fm_4000 fm_8000 digits; do
  # shellcheck disable=SC2086  # the data flags are words
  evaluate --baseline pixels ${DATA[$data]} --output_dir "$OUT/pixels_$data" > "$OUT/pixels_$data.log" 2>&1
  for method in swav unmix; do
    name=${method}_$data
    # shellcheck disable=SC2086
    timed "$name" $PY main_pretrain.py --config "configs/${method}_small.yaml" ${DATA[$data]} ${TRAIN[$data]} \
      --output_dir "$OUT/$name" --device cpu
    evaluate --run "$OUT/$name" --skip_recorded true >> "$OUT/$name.log" 2>&1
    RUNS+=("$name")
  done
done

rm -rf "$KEEP"
for name in "${RUNS[@]}"; do
  mkdir -p "$KEEP/$name"
  cp "$OUT/$name/config.yaml" "$OUT/$name/train_log.jsonl" "$OUT/$name/metrics.jsonl" "$KEEP/$name/"
  cp "$OUT/$name.log" "$KEEP/$name/output.log"
  cp "$OUT/$name.time" "$KEEP/$name/train_wall_seconds"
done
for data in fm_4000 fm_8000 digits; do
  mkdir -p "$KEEP/pixels_$data"
  cp "$OUT/pixels_$data/metrics.jsonl" "$KEEP/pixels_$data/"
  cp "$OUT/pixels_$data.log" "$KEEP/pixels_$data/output.log"
done
printf '{"script": "%s", "git_commit": "%s", "git_dirty": %s, "started": "%s", "finished": "%s"}\n' \
  scripts/small_data.sh "$commit" "$dirty" "$started" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$KEEP/provenance.json"
rm -rf results/small_data
$PY collect_results.py --root "$KEEP" --out results/small_data --combined results/small_data.md --published ''
