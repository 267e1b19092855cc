#!/usr/bin/env python
"""Turn the run directories under a folder into result tables, metric plots and training curves.

    python collect_results.py --root runs/ [--out runs/tables/]

The program lives in src/clusterlab/programs/collect_results.py (installed: the `clusterlab-collect` command);
`--help` lists every flag.
"""
if __name__ == "__main__":
    from clusterlab import signals

    signals.install()  # first: from here on a pre-emption signal requeues (Python's default kills at once)
    from clusterlab.programs import run

    run("collect_results.py")
