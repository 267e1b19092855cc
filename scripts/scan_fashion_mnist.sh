#!/usr/bin/env bash
# SCAN's stages 2 and 3 on a Fashion-MNIST embedding run of this suite, on a 2-core CPU with one thread:
# configs/scan_fashion_mnist.yaml from the embedding's backbone, then configs/scan_selflabel_fashion_mnist.yaml from
# the scan run's chosen head. Both are scored on the test split by every head, by k-means on their backbone features
# and by kNN (k=200 and k=20) on them. The embedding run is only read (its own k-means records, if it has them, are
# printed beside ours at the end).
#   EMB=runs/fashion_mnist/unmix bash scripts/scan_fashion_mnist.sh
#   EMB=runs/fashion_mnist/swav OUT=runs/scan_fm_swav bash scripts/scan_fashion_mnist.sh
# The embedding must use configs/*_fashion_mnist.yaml's backbone (the CIFAR ResNet-18 at width 8). Started again with
# the same OUT, each stage resumes from its checkpoint and recorded evaluations are skipped. Each stage's wall time
# (summed over the starts) goes to $OUT/NAME.time, everything it printed to $OUT/NAME.log; the chosen heads' and
# k-means numbers are printed at the end.
# KEEP=1 then copies the records (each stage's config.yaml with its commit, train_log.jsonl, metrics.jsonl, log and
# wall time, the embedding's config.yaml, and provenance.json) into results/runs/scan_fashion_mnist/<embedding name>/,
# replacing it; with KEEP=1 the script refuses code that no commit holds, as the other result scripts do.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
EMB=${EMB:-}
OUT=${OUT:-runs/scan_fashion_mnist/$(basename "${EMB:-none}")}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SCRIPT=scan_fashion_mnist.sh
source scripts/lib/runs.sh
[ -n "$EMB" ] || fail "EMB is not set: give the Fashion-MNIST embedding run to start from (EMB=runs/fashion_mnist/unmix)"
[ -f "$EMB/checkpoint.pth" ] || fail "EMB=$EMB holds no checkpoint.pth: give a finished embedding run directory"
if [ "${KEEP:-0}" = 1 ]; then
  require_committed_code
fi
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
mkdir -p "$OUT"

score() {  # score NAME: every head of $OUT/NAME, k-means and kNN on its backbone features
  local run=$OUT/$1
  $PY eval_cluster.py --run "$run" --device cpu --skip_recorded true --plot false
  $PY eval_cluster.py --run "$run" --device cpu --skip_recorded true --plot false --assignment kmeans
  $PY eval_knn.py --run "$run" --device cpu --skip_recorded true --k 200 20
}

timed scan $PY main_cluster.py --config configs/scan_fashion_mnist.yaml --pretrained "$EMB" --output_dir "$OUT/scan" \
  --device cpu
score scan >> "$OUT/scan.log" 2>&1
timed selflabel $PY main_cluster.py --config configs/scan_selflabel_fashion_mnist.yaml --pretrained "$OUT/scan" \
  --output_dir "$OUT/selflabel" --device cpu
score selflabel >> "$OUT/selflabel.log" 2>&1
grep -h '"assignment": "kmeans"' "$EMB/metrics.jsonl" 2>/dev/null || echo "($EMB has no k-means record)"
grep -h -e "chosen" -e "k-means" "$OUT/scan.log" "$OUT/selflabel.log" || true
if [ "${KEEP:-0}" = 1 ]; then
  stage_keep "results/runs/scan_fashion_mnist/$(basename "$EMB")"
  mkdir -p "$STAGE/embedding"
  cp "$EMB/config.yaml" "$STAGE/embedding/"
  for name in scan selflabel; do
    keep_run "$name" "$STAGE/$name"
  done
  write_provenance "$STAGE/provenance.json"
  replace_kept
  echo "records kept in $KEPT"
fi
