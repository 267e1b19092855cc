"""What the Slurm tests share: the repository, the cluster check, tiny training flags, job and run-directory helpers.

Test modules here import them with `from slurm_helpers import ...` (pytest puts this folder on sys.path).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = ROOT / "tests" / "slurm" / "local_cluster.sh"
TINY = {"method": "swav", "dataset": "digits", "width": 4, "hidden_mlp": 32, "feat_dim": 16, "size_crops": [8],
        "device": "cpu"}


def require_cluster(partition: str | None = None) -> None:
    """Skip (or, with CLUSTERLAB_REQUIRE_SLURM=1 as .ci/run sets, fail) unless a cluster answers and every node of
    `partition` (default: the cluster's one-node partition) is usable."""
    check = subprocess.run(["bash", str(CLUSTER_SCRIPT), "status", *([partition] if partition else [])],
                           capture_output=True, text=True)
    if check.returncode != 0:
        what = f"partition {partition!r} is not usable" if partition else "no Slurm cluster answers"
        reason = f"{what} (start it with `bash tests/slurm/local_cluster.sh start`, which needs root and apt)"
        if os.environ.get("CLUSTERLAB_REQUIRE_SLURM") == "1":
            pytest.fail(f"CLUSTERLAB_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)


def env(**extra) -> dict:
    """The environment of everything the tests start; jobs inherit it (sbatch exports it), so this tree's package
    and entry scripts come first on the path, ahead of whatever is installed."""
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def launch(*args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env(), timeout=600)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def write_grid(path: Path, **spec) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cluster_report(job_id: str | None = None) -> str:
    """What a test that timed out on the cluster needs to say why: the job, the queue, the nodes and the daemons' last
    log lines (a job that never starts, a node left drained, a step that cannot be created show there). Never raises:
    a part it cannot read says so, and the timeout stays the error."""
    state_dir = Path(os.environ.get("CLUSTERLAB_SLURM_DIR", "/var/tmp/clusterlab-slurm"))

    def output(*command: str) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"({command[0]}: {error})"
        return (done.stdout + done.stderr).strip()

    parts = []
    if job_id:
        parts.append(f"job {job_id}: " + output("scontrol", "-o", "show", "job", job_id))
    parts.append("queue:\n" + output("squeue", "-h", "-o", "%i %j %P %T %M %C %r"))
    parts.append("nodes:\n" + output("sinfo", "-h", "-N", "-o", "%N %P %t %C %E"))
    for log in sorted((state_dir / "log").glob("slurm*.log")):
        try:
            text = log.read_text(errors="replace")
        except OSError as error:
            parts.append(f"{log.name}: {error}")
            continue
        lines = [line for line in text.splitlines() if "pmix" not in line.lower()
                 and "MPI: Cannot create context" not in line][-15:]  # every daemon start logs the missing PMIx
        parts.append(f"{log.name}, last lines:\n" + "\n".join(lines))
    return "\n".join(parts)


def cancel(job_id: str) -> str:
    """scancel the job; what became of it, for an error message."""
    # scancel exits 0 even when it refuses (an unknown job): only -v prints its errors
    done = subprocess.run(["scancel", "-v", job_id], capture_output=True, text=True)
    errors = [line for line in (done.stderr + done.stdout).splitlines() if "error" in line]
    return "cancelled" if done.returncode == 0 and not errors else f"not cancelled: {' '.join(errors)}"


def give_up(job_id: str | None) -> str:
    """The end of a timeout's message: the cluster's state, then the job (when given) cancelled, since on a one-node
    partition a stuck job would hold up every later test."""
    report = cluster_report(job_id)
    return f" (job {job_id} {cancel(job_id)})\n{report}" if job_id else f"\n{report}"


@contextmanager
def cancelled_on_exit(job_id: str):
    """Around a test's dealings with its job: however they end, the job is not left in the queue (scancel of a
    finished job changes nothing)."""
    try:
        yield
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


def wait_job(job_id: str, timeout: float = 300) -> None:
    """Until the job has left the queue; on timeout, give_up."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
        # an squeue that failed (slurmctld busy) printed nothing: that says nothing about the job
        if queue.returncode == 0 and job_id not in queue.stdout.split():
            return
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still queued after {timeout} s{give_up(job_id)}")


def log_lines(run: Path) -> int:
    path = run / "train_log.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_lines(run: Path, count: int, timeout: float = 180, job_id: str | None = None) -> None:
    """Until the run's train_log.jsonl has `count` lines; on timeout, give_up."""
    deadline = time.time() + timeout
    while log_lines(run) < count:
        if time.time() > deadline:
            raise AssertionError(f"{run} logged only {log_lines(run)} lines after {timeout} s{give_up(job_id)}")
        time.sleep(0.3)


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
