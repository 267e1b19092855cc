"""What the Slurm tests share: the repository, the cluster check, tiny training flags, job and run-directory helpers.

Test modules here import them with `from slurm_helpers import ...` (pytest puts this folder on sys.path).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def wait_job(job_id: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split()
        if job_id not in out:
            return
        time.sleep(1)
    raise TimeoutError(f"job {job_id} still queued after {timeout} s")


def log_lines(run: Path) -> int:
    path = run / "train_log.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_lines(run: Path, count: int, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while log_lines(run) < count:
        assert time.time() < deadline, f"{run} logged only {log_lines(run)} lines"
        time.sleep(0.3)


def records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
