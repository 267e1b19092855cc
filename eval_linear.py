#!/usr/bin/env python
"""Linear probe on a run's frozen backbone: top-1 / top-5 on the test split at the last epoch.

    python eval_linear.py --run runs/unmix_c10_400ep [--cached_features true]

The program lives in src/clusterlab/programs/eval_linear.py; one record goes to RUN/metrics.jsonl.
"""
if __name__ == "__main__":
    from clusterlab import signals

    signals.install()  # first: from here on a pre-emption signal requeues (Python's default kills at once)
    from clusterlab.programs import run

    run("eval_linear.py")
