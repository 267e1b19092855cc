#!/usr/bin/env bash
# Every method on the real Fashion-MNIST benchmark (Debian's dataset-fashion-mnist), on a 2-core CPU: two queues of
# one thread each run side by side, then the pixel baselines and the result tables in results/.
#   bash scripts/fashion_mnist.sh            # all of it (about an hour and a half on 2 cores)
#   OUT=runs/fm bash scripts/fashion_mnist.sh
# SeLa and Self-Classifier are scored by their heads and by k-means on their backbone features.
# SwAV and Un-Mix also get the linear probe, on cached features (a CPU-sized protocol, recorded as such).
# Each run's evaluations append to its metrics.jsonl; collect_results.py turns them into results/*.{csv,md,tex}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/fashion_mnist}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$OUT"

timed() {  # timed NAME COMMAND...: run, and note its wall time in $OUT/NAME.time
  local name=$1 start=$SECONDS
  shift
  "$@" > "$OUT/$name.log" 2>&1
  echo "$((SECONDS - start))" > "$OUT/$name.time"
}

evaluate() {  # evaluate RUN [eval_knn flags...]
  local run=$1
  shift
  $PY eval_knn.py --run "$run" --device cpu --skip_recorded true "$@"
  $PY eval_cluster.py --run "$run" --device cpu --skip_recorded true
}

queue_a() {
  for name in swav unmix; do
    timed "$name" $PY main_pretrain.py --config "configs/${name}_fashion_mnist.yaml" --output_dir "$OUT/$name" --device cpu
    evaluate "$OUT/$name" >> "$OUT/$name.log" 2>&1
    $PY eval_linear.py --run "$OUT/$name" --device cpu --skip_recorded true --cached_features true \
      >> "$OUT/$name.log" 2>&1
  done
  for name in sela selfclassifier; do
    timed "$name" $PY main_cluster.py --config "configs/${name}_fashion_mnist.yaml" --output_dir "$OUT/$name" --device cpu
    evaluate "$OUT/$name" >> "$OUT/$name.log" 2>&1
    $PY eval_cluster.py --run "$OUT/$name" --device cpu --skip_recorded true --assignment kmeans >> "$OUT/$name.log" 2>&1
  done
}

queue_b() {
  for name in npid superand; do
    timed "$name" $PY main_pretrain.py --config "configs/${name}_fashion_mnist.yaml" --output_dir "$OUT/$name" --device cpu
    evaluate "$OUT/$name" --features embedding >> "$OUT/$name.log" 2>&1
  done
  timed embedul $PY main_cluster.py --config configs/embedul_fashion_mnist.yaml --pretrained "$OUT/superand" \
    --output_dir "$OUT/embedul" --device cpu
  evaluate "$OUT/embedul" >> "$OUT/embedul.log" 2>&1
  $PY eval_knn.py --baseline pixels --dataset fashion_mnist --output_dir "$OUT/pixels" > "$OUT/pixels.log" 2>&1
  $PY eval_knn.py --baseline pixels --dataset fashion_mnist --output_dir "$OUT/pixels" --k 20 >> "$OUT/pixels.log" 2>&1
  $PY eval_cluster.py --baseline pixels --dataset fashion_mnist --output_dir "$OUT/pixels" >> "$OUT/pixels.log" 2>&1
}

queue_a & a=$!
queue_b & b=$!
wait $a && wait $b
$PY collect_results.py --root "$OUT" --out results
