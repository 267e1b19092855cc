#!/usr/bin/env bash
# Installs Debian's dataset-fashion-mnist (the real Fashion-MNIST files in /usr/share/datasets/fashion-mnist) for the
# Fashion-MNIST loader test, the way tests/slurm/local_cluster.sh installs Slurm: only with root and apt-get.
# Exit 0 when the files are there (already or now), 3 with the reason when they cannot be installed; the test then
# skips, or fails under CLUSTERLAB_REQUIRE_DATA=1 (.ci/run).
set -euo pipefail
PACKAGE=dataset-fashion-mnist
DIR=/usr/share/datasets/fashion-mnist
installed() {
  local name
  for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f "$DIR/$name.gz" ] || return 1
  done
}
installed && exit 0
[ "$(id -u)" = 0 ] || { echo "not root: cannot install $PACKAGE" >&2; exit 3; }
command -v apt-get >/dev/null || { echo "no apt-get: cannot install $PACKAGE" >&2; exit 3; }
install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$PACKAGE" >/dev/null; }
echo "installing $PACKAGE"
# The package lists may be missing on a fresh machine: refresh them only when the first attempt fails.
install 2>/dev/null || { apt-get update -qq && install; }
installed || { echo "$PACKAGE installed, but $DIR lacks its files" >&2; exit 3; }
