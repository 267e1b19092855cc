#!/usr/bin/env python
"""Weighted kNN accuracy of a run's features: train split as the labelled memory, test split as queries.

    python eval_knn.py --run runs/swav_digits [--k 20 200 --temperature 0.1 --features backbone]

The program lives in src/clusterlab/programs/eval_knn.py; one record per k goes to RUN/metrics.jsonl.
"""
if __name__ == "__main__":
    from clusterlab import signals

    signals.install()  # first: from here on a pre-emption signal requeues (Python's default kills at once)
    from clusterlab.programs import run

    run("eval_knn.py")
