#!/usr/bin/env python
"""Linear probe on a run's frozen backbone: top-1 / top-5 on the test split at the last epoch.

    python eval_linear.py --run runs/unmix_c10_400ep [--cached_features true]

The program lives in src/clusterlab/programs/eval_linear.py; one record goes to RUN/metrics.jsonl.
"""
if __name__ == "__main__":
    from clusterlab.programs import run  # catches pre-emption signals before anything heavy is imported

    run("eval_linear.py")
