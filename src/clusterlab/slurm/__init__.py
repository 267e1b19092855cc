"""Slurm: grids of runs (grid.py), the jobs submitit runs (jobs.py), generated sbatch scripts (sbatch.py).

This module imports nothing heavy: the run directory's lock and a job's signal handling read the job id early."""
from __future__ import annotations

import os


def job_id(environ=os.environ) -> str | None:
    """The Slurm job id that survives a requeue, of this process or of `environ`: an array task is ARRAYID_TASK
    (the id submitit requeues it by; `scontrol show job` with the array's own id lists every task); None outside
    Slurm."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return environ.get("SLURM_JOB_ID")
