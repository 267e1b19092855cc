#!/usr/bin/env python
"""Pre-train an embedding with a self-supervised method (SwAV, Un-Mix, NPID, Super-AND), into a run directory.

    python main_pretrain.py --config configs/swav_digits.yaml [--any_flag value ...]

The program lives in src/clusterlab/programs/train.py (its training loop reads top to bottom); `--help` lists every
flag, `--method NAME --help` adds the method's own.
"""
if __name__ == "__main__":
    from clusterlab import signals

    signals.install()  # first: from here on a pre-emption signal requeues (Python's default kills at once)
    from clusterlab.programs import run

    run("main_pretrain.py")
