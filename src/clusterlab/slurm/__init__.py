"""Slurm: grids of runs (grid.py), the jobs submitit runs (jobs.py), generated sbatch scripts (sbatch.py)."""
