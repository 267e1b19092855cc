#!/usr/bin/env bash
# The tries configs/swav_small.yaml was chosen from, on Fashion-MNIST's 4,000-image subset (400 per class, seed 0),
# and two tries of it on digits after scripts/small_data.sh found it collapsing there, each scored like
# scripts/small_data.sh scores a run: kNN at k=20 and k=200 and k-means with 10 clusters on the test split (the
# whole 10,000 images for Fashion-MNIST), raw pixels by the same code. The numbers in the config's header come from
# these commands (run one at a time, on one thread, while other runs shared the 2 cores: wall times vary with that
# load).
#   bash scripts/small_data_tries.sh           # OUT=runs/small_data_tries by default; about an hour
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SCRIPT=small_data_tries.sh
source scripts/lib/runs.sh  # require_empty_out; these tries keep nothing in results/runs/
OUT=${OUT:-runs/small_data_tries}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
require_empty_out
DATA=$OUT/data/fm_4000
$PY scripts/export_imagefolder.py --dataset fashion_mnist --per_class 400 --seed 0 --out "$DATA"

evaluate() {  # evaluate RUN_OR_BASELINE_FLAGS...
  $PY eval_knn.py --device cpu --k 20 200 "$@"
  $PY eval_cluster.py --device cpu "$@"
}

evaluate --baseline pixels --dataset imagefolder --data_path "$DATA" --output_dir "$OUT/pixels"
# A: the Fashion-MNIST recipe at batch 128 for 60 epochs, 30 prototypes frozen for one epoch, 2 crops of 20 px
A=(--config configs/swav_fashion_mnist.yaml --dataset imagefolder --data_path "$DATA" --batch_size 128 --epochs 60
   --warmup_epochs 5 --nmb_prototypes 30 --freeze_prototypes_epochs 1 --device cpu)
# B: A plus 4 crops of 12 px (configs/swav_small.yaml)
B=("${A[@]}" --nmb_crops 2 4 --size_crops 20 12 --min_scale_crops 0.3 0.1 --max_scale_crops 1.0 0.4)
# On digits (pixels: scripts/small_data.sh): C, the recipe with epsilon 0.02; D, the same for 270 epochs (the
# recipe's 240,000 images seen, as 60 epochs of 4,000)
C=(--config configs/swav_small.yaml --dataset digits --epsilon 0.02 --epochs 60 --device cpu)
D=("${C[@]}" --epochs 270)
# On the 4,000-image subset again: E, B with epsilon 0.02; F, B for 120 epochs (the recipe since)
E=("${B[@]}" --epsilon 0.02)
F=("${B[@]}" --epochs 120)
for try in A B C D E F; do
  declare -n flags=$try
  start=$SECONDS
  $PY main_pretrain.py "${flags[@]}" --output_dir "$OUT/$try"
  echo "try $try: trained in $((SECONDS - start)) s"
  evaluate --run "$OUT/$try"
done
