#!/usr/bin/env python
"""Slurm latencies on the local cluster (tests/slurm/local_cluster.sh start):

1. grid: wall time from `launch.py --grid configs/grids/digits_smoke.yaml` to the last metrics record written;
2. requeue overhead: one training job run uninterrupted vs the same job sent SIGUSR2 once mid-run (it saves,
   requeues, waits for Slurm to start it again, resumes); the difference is what one pre-emption costs.

    python bench/slurm_latency.py [--repeats 3]

Prints a Markdown table (median, min, max over repeats).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clusterlab import rundir  # noqa: E402
from clusterlab.config import OneLineErrorParser, positive_int  # noqa: E402
# the jobs import this checkout's package, whatever the environment's own install points at
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
ONE_RUN = {"name": "bench", "program": "main_pretrain.py", "config": "configs/swav_digits.yaml", "axes": {"seed": [0]},
           "flags": {"method": "swav", "dataset": "digits", "width": 4, "hidden_dim": 32, "embed_dim": 16,
                     "size_crops": [8], "batch_size": 32, "epochs": 6, "log_every": 1, "device": "cpu"},
           "resources": {"cpus_per_task": 1, "mem_gb": 2, "timeout_min": 20}}


def last_record_time(root: Path) -> float:
    return max(path.stat().st_mtime for path in root.rglob("metrics.jsonl"))


def launch(*flags: str) -> None:
    """launch.py with `flags`; its own message, where it fails (no Slurm controller answering...), ends the bench."""
    done = subprocess.run([sys.executable, "launch.py", *flags], cwd=ROOT, env=ENV, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"slurm_latency.py: launch.py {' '.join(flags)} failed: {done.stderr.strip()}")


def grid_latency(tmp: Path) -> float:
    start = time.time()
    launch("--grid", "configs/grids/digits_smoke.yaml", "--output_root", str(tmp / "grid"), "--wait")
    return last_record_time(tmp / "grid") - start


def one_job(tmp: Path, name: str, interrupt_at_line: int | None) -> float:
    grid = tmp / f"{name}.yaml"
    grid.write_text(yaml.safe_dump(ONE_RUN))
    start = time.time()
    launch("--grid", str(grid), "--output_root", str(tmp / name))
    run = tmp / name / "swav_digits_s0"
    job = json.loads((run / "slurm" / "jobs.jsonl").read_text().splitlines()[0])["job_id"]
    if interrupt_at_line:
        log = run / "train_log.jsonl"
        def lines() -> int:
            return len(log.read_text().splitlines()) if log.exists() else 0

        while lines() < interrupt_at_line:
            # (a job that failed early would be waited for forever; the log read again: it may have just written)
            if not queued(job) and lines() < interrupt_at_line:
                sys.exit(f"slurm_latency.py: job {job} left the queue before {log} had {interrupt_at_line} lines; "
                         f"its run: {run}")
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR2", job], check=True)
    while queued(job):
        time.sleep(0.2)
    state = rundir.read_status(run).get("state")
    if state != "finished":
        sys.exit(f"slurm_latency.py: job {job} ended with its run {state or 'without a status'}; see {run}")
    return (run / "status.json").stat().st_mtime - start


def queued(job: str) -> bool:
    """Whether Slurm still lists the job (pending, running or requeued); a controller that does not answer ends the
    bench (the jobs' end could not be told)."""
    listed = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
    if listed.returncode:
        sys.exit(f"slurm_latency.py: squeue failed: {listed.stderr.strip()}")
    return job in listed.stdout.split()


def main():
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=3)
    args = parser.parse_args()
    grid, plain, interrupted = [], [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            grid.append(grid_latency(tmp))
            plain.append(one_job(tmp, "plain", None))
            interrupted.append(one_job(tmp, "interrupted", 60))
    overhead = [b - a for a, b in zip(plain, interrupted)]
    print("| measurement | median s | min s | max s |")
    print("| --- | --- | --- | --- |")
    for label, values in (("digits_smoke grid (4 trainings + 4 evaluation jobs): launch to last record", grid),
                          ("one training job, uninterrupted: submit to finished", plain),
                          ("the same job pre-empted once (SIGUSR2, requeue, resume)", interrupted),
                          ("requeue overhead (difference)", overhead)):
        print(f"| {label} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |")


if __name__ == "__main__":
    main()
