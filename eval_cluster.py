#!/usr/bin/env python
"""Clustering quality of a run (k-means on its features, or its heads): ACC, NMI, AMI, ARI.

    python eval_cluster.py --run runs/swav_digits [--clusters 10 20]
    python eval_cluster.py --run runs/sela_cifar10

The program lives in src/clusterlab/programs/eval_cluster.py; records go to RUN/metrics.jsonl.
"""
if __name__ == "__main__":
    from clusterlab import signals

    signals.install()  # first: from here on a pre-emption signal requeues (Python's default kills at once)
    from clusterlab.programs import run

    run("eval_cluster.py")
