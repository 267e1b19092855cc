#!/usr/bin/env python
"""Launch a grid of runs on Slurm through submitit, or generate the sbatch scripts of the recipes.

    python launch.py --grid configs/grids/NAME.yaml [--dry-run] [--wait] [--cluster slurm|local|debug]
    python launch.py --emit-sbatch [--recipes configs/recipes.yaml] [--sbatch_dir sbatch]

The program lives in src/clusterlab/programs/launch.py (installed: the `clusterlab-launch` command); `--help` lists
every flag.
"""
if __name__ == "__main__":
    from clusterlab import signals

    signals.install()  # first: from here on a pre-emption signal requeues (Python's default kills at once)
    from clusterlab.programs import run

    run("launch.py")
