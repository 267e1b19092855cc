#!/usr/bin/env bash
# Short tries of configs/unmix_fashion_mnist.yaml on full Fashion-MNIST, each one change against the recipe, for
# what might lift kNN top-1 past the ~88 at k=20 that longer, wider or multi-crop runs reached (README, Results):
# the recipe's own 10 epochs at width 8 in bf16 autocast on both cores (scripts/fashion_mnist_bf16.sh's settings),
# each scored with eval_knn.py at k=20 and k=200 on the test split. The numbers in docs/methods/unmix.md come from
# these commands.
#   bash scripts/fashion_mnist_tries.sh             # OUT=runs/fashion_mnist_tries, every try: about 3 hours
#   TRIES="R A" bash scripts/fashion_mnist_tries.sh  # only these
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SCRIPT=fashion_mnist_tries.sh
source scripts/lib/runs.sh  # fail and timed; these tries keep nothing in results/runs/
OUT=${OUT:-runs/fashion_mnist_tries}
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
mkdir -p "$OUT"

R=(--config configs/unmix_fashion_mnist.yaml --amp bf16 --channels_last --device cpu)  # the recipe as it is
P=("${R[@]}" --size_crops 28)          # full-resolution crops: about twice the work per image
A=("${R[@]}" --nmb_prototypes 300)     # 30 prototypes per class instead of 10
B=("${R[@]}" --min_scale_crops 0.14)   # smaller crops, as SwAV's ImageNet recipe
C=("${R[@]}" --temperature 0.2)        # softer predictions
D=("${R[@]}" --temperature 0.07)       # sharper predictions
E=("${R[@]}" --epsilon 0.05)           # smoother Sinkhorn codes
F=("${R[@]}" --batch_size 64 --lr 1.2 --final_lr 0.0012)  # 4x the steps, the learning rate scaled with the batch
G=("${R[@]}" --lr 0.6 --final_lr 0.0006)                   # SwAV's learning rate for batch 256
I=("${R[@]}" --min_scale_crops 0.5)    # gentler crops
K=("${R[@]}" --min_scale_crops 0.7)    # gentler still
J=("${R[@]}" --queue_length 3840 --epoch_queue_starts 2)  # SwAV's queue from the third epoch (15 batches of 256)
L=("${R[@]}" --weight_decay 1e-5)      # ten times SwAV's weight decay
M=("${R[@]}" --weight_decay 1e-4)      # a hundred times
N=("${R[@]}" --lr 9.6 --final_lr 0.0096)  # twice the learning rate (G halved it eightfold and lost 2.6 points)
O=("${R[@]}" --arch resnet18_bottleneck)  # Un-Mix's CIFAR backbone: 256-d features at width 8 instead of 64-d
ALL="R P A B C D E F G I J K L M N O"
for try in ${TRIES:-$ALL}; do  # every name checked before anything trains
  [[ " $ALL " == *" $try "* ]] || fail "TRIES names '$try', which is not a try: choose among $ALL"
  [ -z "$(ls -A "$OUT/$try" 2>/dev/null)" ] || fail "$OUT/$try is not empty: remove it or choose another OUT"
done
for try in ${TRIES:-$ALL}; do
  declare -n flags=$try
  timed "$try" $PY main_pretrain.py "${flags[@]}" --output_dir "$OUT/$try"
  echo "try $try: trained in $(cat "$OUT/$try.time") s"
  $PY eval_knn.py --run "$OUT/$try" --device cpu --k 20 200 | tee -a "$OUT/$try.log"
done
