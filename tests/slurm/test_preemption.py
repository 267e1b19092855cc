"""A whole sbatch recipe signalled at random moments, start-up and evaluation steps included, ends COMPLETED with
the uninterrupted job's results.

Slurm's time-limit signal reaches the batch shell (`--signal=B:USR2@...`), which passes it to the running step or,
between steps, requeues at once. The test sends USR2 the same way (`scancel --batch`) five times, one of them USR1 (what
other tools ask Slurm for, `--signal=B:USR1@...`: the shell had no trap for it and died, the job FAILED): as the job
starts (the batch shell's traps installed, Python still starting up), at random moments of training (fixed seed), and as
the evaluations start; each time the job requeues and the next start resumes. The final checkpoint equals the
uninterrupted job's bit for bit, the metrics records are the same, and no file is left behind or missing.
"""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time

import pytest

from clusterlab import checkpoint, rundir
from conftest import assert_same_tensors
from slurm_helpers import ROOT, cancelled_on_exit, cluster_report, env, require_cluster, wait_job

pytestmark = pytest.mark.slurm

FLAGS = ["--epochs", "4", "--width", "4", "--hidden_mlp", "32", "--feat_dim", "16", "--nmb_prototypes", "10",
         "--size_crops", "8", "--batch_size", "32", "--log_every", "1"]


def submit(run, log_dir) -> str:
    return subprocess.run(
        ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={log_dir}/%j.out", "sbatch/swav_digits.sh", *FLAGS],
        env=env(EXPERIMENT_PATH=str(run), PYTHON=sys.executable, EVAL_CLUSTER_ARGS="--restarts 2 --plot false"),
        capture_output=True, text=True, check=True).stdout.strip()


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    found = re.search(rf"\b{field}=(\S+)", out)
    return found.group(1) if found else ""


def wait_running(job: str, restarts: int, timeout: float = 120) -> None:
    """Until the job's start number `restarts` is running."""
    deadline = time.time() + timeout
    while not (job_field(job, "JobState") == "RUNNING" and int(job_field(job, "Restarts") or 0) == restarts):
        assert time.time() < deadline, (f"job {job}: {job_field(job, 'JobState')}, {job_field(job, 'Restarts')} "
                                        f"restarts\n{cluster_report(job)}")
        time.sleep(0.05)


def until(condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out\n{cluster_report()}"
        time.sleep(0.05)


def signal_batch(job: str, name: str = "USR2") -> None:
    subprocess.run(["scancel", "--batch", f"--signal={name}", job], check=True, capture_output=True)


def run_files(run) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "slurm" not in p.parts)


def record_values(run) -> list:
    return sorted((r["eval"], r["protocol"].get("clusters", 0), r["metrics"]["top1"] if r["eval"] == "knn"
                   else r["metrics"]["acc"]) for r in rundir.read_jsonl(run / "metrics.jsonl"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    require_cluster()
    folder = tmp_path_factory.mktemp("reference")
    job = submit(folder / "run", folder)
    wait_job(job, timeout=600)
    assert job_field(job, "JobState") == "COMPLETED", (folder / f"{job}.out").read_text()[-3000:]
    return folder / "run"


def test_five_signals_at_random_moments_requeue_and_end_with_the_same_results(tmp_path, reference):
    rng = random.Random(7)
    run = tmp_path / "run"
    job = submit(run, tmp_path)
    moments = []
    # 1. at once: the batch shell has installed its traps (its first lines; it links its log into the run's slurm/
    # folder soon after) and Python is still starting up. A signal before the shell's first line meets no trap and
    # kills it
    # (Slurm's default action for USR2): no script can catch that.
    link = run / "slurm" / f"{job}.out"

    def log_link():
        """Each start of the batch shell links its log anew after installing its traps: a new link is a shell
        that can take the signal."""
        try:
            found = os.lstat(link)
        except FileNotFoundError:
            return None
        return found.st_ino, found.st_mtime_ns

    with cancelled_on_exit(job):
        wait_running(job, 0)
        until(lambda: log_link() is not None)
        previous = log_link()
        signal_batch(job)
        moments.append("start-up")
        # 2.-4. at random moments of training
        for restart in (1, 2, 3):
            wait_running(job, restart)
            until(lambda: log_link() not in (None, previous))
            time.sleep(rng.uniform(0.5, 6.0))
            previous = log_link()
            signal_batch(job, "USR1" if restart == 2 else "USR2")
            moments.append(rundir.read_status(run).get("state", "starting"))
        # 5. as the evaluations start: the fifth start has finished training (or found it finished)
        until(lambda: int(job_field(job, "Restarts") or 0) == 4 and rundir.read_status(run).get("state") == "finished",
              timeout=300)
        signal_batch(job)
        moments.append("evaluation")
        wait_job(job, timeout=600)

    log = (tmp_path / f"{job}.out").read_text()
    assert job_field(job, "JobState") == "COMPLETED", log[-3000:]
    assert int(job_field(job, "Restarts")) >= 5, (moments, log[-3000:])
    assert "Traceback" not in log, log[-3000:]
    assert run_files(run) == run_files(reference)
    ours, theirs = checkpoint.load(run / "checkpoint.pth"), checkpoint.load(reference / "checkpoint.pth")
    for key in ("model", "optimizer", "method_state", "method_random", "rng", "epoch", "step", "global_step"):
        assert_same_tensors(ours[key], theirs[key], key)
    assert record_values(run) == record_values(reference)
    steps = [(r["epoch"], r["step"]) for r in rundir.read_jsonl(run / "train_log.jsonl") if "step" in r]
    assert steps == [(r["epoch"], r["step"]) for r in rundir.read_jsonl(reference / "train_log.jsonl") if "step" in r]
