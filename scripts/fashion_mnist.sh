#!/usr/bin/env bash
# Every method on the real Fashion-MNIST benchmark (Debian's dataset-fashion-mnist), on a 2-core CPU: two queues of
# one thread each run side by side, then the pixel baselines, the records kept in results/runs/fashion_mnist/ and
# the tables and curves in results/.
#   bash scripts/fashion_mnist.sh            # all of it (bench/RESULTS.md: the wall time of each run)
#   OUT=runs/fm bash scripts/fashion_mnist.sh
#   FORCE=1 bash scripts/fashion_mnist.sh    # on a tree with uncommitted changes: the runs are then marked dirty
# It refuses to start on a working tree whose tracked files (outside results/, and results/published.csv) differ
# from the commit (the results would come from code no commit holds) unless FORCE=1, and on an $OUT that is not
# empty (its runs would resume, from other code).
# SeLa and Self-Classifier are scored by their heads and by k-means on their backbone features. SCAN's two stages
# (scripts/scan_fashion_mnist.sh) start from the SwAV run; NPID runs its 20-epoch recipe.
# SwAV and Un-Mix also get the linear probe, on cached features (a CPU-sized protocol, recorded as such).
# The full run directories (checkpoints included) stay in $OUT; results/runs/fashion_mnist/ is replaced by what the
# tables come from: per run config.yaml (flags, commit, git_dirty, versions), train_log.jsonl, metrics.jsonl,
# output.log (all it printed, training and evaluations) and train_wall_seconds (the training's wall time); the
# pixel baselines' metrics.jsonl and output.log; provenance.json (commit, git_dirty, start and end of the script).
# collect_results.py then builds results/fashion_mnist.{md,csv,tex}, its plots and results/curves/ from that copy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source scripts/lib/runs.sh
begin_study fashion_mnist

pretrain_and_probe() {  # pretrain_and_probe NAME: the recipe configs/NAME_fashion_mnist.yaml, kNN, k-means, linear
  local name=$1
  timed "$name" $PY main_pretrain.py --config "configs/${name}_fashion_mnist.yaml" --output_dir "$OUT/$name" --device cpu
  evaluate_run "$OUT/$name" >> "$OUT/$name.log" 2>&1
  $PY eval_linear.py --run "$OUT/$name" --device cpu --skip_recorded true --cached_features true \
    >> "$OUT/$name.log" 2>&1
}

queue_a() {
  pretrain_and_probe swav
  # SCAN's two stages from the SwAV run (scripts/scan_fashion_mnist.sh, its runs in $OUT/scan/).
  EMB="$OUT/swav" OUT="$OUT/scan" PY="$PY" bash scripts/scan_fashion_mnist.sh > "$OUT/scan.log" 2>&1
  pretrain_and_probe unmix
  for name in sela selfclassifier; do
    timed "$name" $PY main_cluster.py --config "configs/${name}_fashion_mnist.yaml" --output_dir "$OUT/$name" --device cpu
    evaluate_run "$OUT/$name" >> "$OUT/$name.log" 2>&1
    $PY eval_cluster.py --run "$OUT/$name" --device cpu --skip_recorded true --assignment kmeans >> "$OUT/$name.log" 2>&1
  done
}

queue_b() {
  # NPID's 20-epoch recipe (34 to 45 min of one thread; the 6-epoch one stays below raw pixels).
  timed npid $PY main_pretrain.py --config configs/npid_fashion_mnist_20ep.yaml --output_dir "$OUT/npid" --device cpu
  evaluate_run "$OUT/npid" --features embedding >> "$OUT/npid.log" 2>&1
  timed superand $PY main_pretrain.py --config configs/superand_fashion_mnist.yaml --output_dir "$OUT/superand" \
    --device cpu
  evaluate_run "$OUT/superand" --features embedding >> "$OUT/superand.log" 2>&1
  # EmbedUL's stage 2 on the Super-AND run.
  timed embedul $PY main_cluster.py --config configs/embedul_fashion_mnist.yaml --pretrained "$OUT/superand" \
    --output_dir "$OUT/embedul" --device cpu
  evaluate_run "$OUT/embedul" >> "$OUT/embedul.log" 2>&1
  evaluate_pixels fashion_mnist > "$OUT/pixels.log" 2>&1
}

queue_a & a=$!
queue_b & b=$!
wait_for_queues $a $b

stage_keep "$KEEP"
for name in swav unmix npid superand sela selfclassifier embedul; do
  keep_run "$name" "$STAGE/$name"
done
OUT="$OUT/scan" keep_run scan "$STAGE/scan"
OUT="$OUT/scan" keep_run selflabel "$STAGE/scan_selflabel"
keep_baseline pixels "$STAGE/pixels"
collect_staged --out "$STAGED_TABLES"
replace_kept
