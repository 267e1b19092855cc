"""scripts/fashion_mnist.sh's bookkeeping, with a stand-in for Python (the real runs take hours): it refuses a tree
with uncommitted changes unless FORCE=1 and a non-empty OUT, and keeps in results/runs/fashion_mnist/ exactly the
files the repository's copy holds, plus provenance.json naming the commit; the tables are built from that copy."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

# Python's stand-in: training writes a run directory with a checkpoint, an evaluation appends a record to its run
# (or a baseline's --output_dir; eval_knn.py one per --k value), collect_results.py notes its arguments.
FAKE_PYTHON = r"""#!/bin/bash
program=$1; shift
value() { local key=$1; shift; while [ $# -gt 0 ]; do [ "$1" = "$key" ] && { echo "$2"; return; }; shift; done; }
case $program in
  main_pretrain.py|main_cluster.py)
    run=$(value --output_dir "$@"); mkdir -p "$run"
    echo "args: {}" > "$run/config.yaml"; echo '{"epoch": 0}' > "$run/train_log.jsonl"; touch "$run/checkpoint.pth"
    echo "trained $run" ;;
  eval_*.py)  # one record, or one per value of eval_knn.py's --k
    run=$(value --run "$@"); run=${run:-$(value --output_dir "$@")}; mkdir -p "$run"
    records=0; in_k=0
    for arg in "$@"; do
      case $arg in --k) in_k=1 ;; --*) in_k=0 ;; *) records=$((records + in_k)) ;; esac
    done
    for _ in $(seq "$((records > 0 ? records : 1))"); do
      echo "{\"program\": \"$program\"}" >> "$run/metrics.jsonl"
    done
    echo "evaluated $run" ;;
  collect_results.py) echo "$*" > collect_results.args ;;
esac
"""


@pytest.fixture
def scratch(tmp_path) -> Path:
    """A committed checkout holding the script, and the stand-in Python outside it."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for script in ("fashion_mnist.sh", "scan_fashion_mnist.sh"):
        shutil.copy(ROOT / "scripts" / script, repo / "scripts")
    shutil.copytree(ROOT / "scripts" / "lib", repo / "scripts" / "lib")
    (repo / ".gitignore").write_text("/runs/\n")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "scratch")
    return repo


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          capture_output=True, text=True, check=True).stdout.strip()


def run_script(repo: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "scripts" / "fashion_mnist.sh")], capture_output=True, text=True,
                          env={**os.environ, "PY": str(repo.parent / "python"), **env}, timeout=120)


def files_below(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def test_keeps_exactly_what_results_runs_holds_and_names_the_commit(scratch):
    done = run_script(scratch)
    assert done.returncode == 0, done.stderr
    kept = scratch / "results" / "runs" / "fashion_mnist"
    assert files_below(kept) == files_below(ROOT / "results" / "runs" / "fashion_mnist") | {"provenance.json"}
    assert (kept / "swav" / "output.log").read_text().splitlines()[:2] == ["trained runs/fashion_mnist/swav",
                                                                          "evaluated runs/fashion_mnist/swav"]
    assert int((kept / "swav" / "train_wall_seconds").read_text()) >= 0
    assert not list(kept.rglob("*.pth"))  # checkpoints stay in OUT
    provenance = json.loads((kept / "provenance.json").read_text())
    assert (provenance["git_commit"], provenance["git_dirty"]) == (git(scratch, "rev-parse", "HEAD"), False)
    assert (scratch / "collect_results.args").read_text().split() == ["--root", "results/runs/fashion_mnist",
                                                                      "--out", "results"]


def test_refuses_uncommitted_changes_unless_forced(scratch):
    with open(scratch / "scripts" / "fashion_mnist.sh", "a") as handle:
        handle.write("# changed\n")
    done = run_script(scratch)
    assert done.returncode == 2 and not (scratch / "runs").exists() and not (scratch / "results").exists()
    assert done.stderr.startswith("fashion_mnist.sh: error: 1 tracked file(s) differ from commit ")
    assert "FORCE=1" in done.stderr and len(done.stderr.splitlines()) == 1
    forced = run_script(scratch, FORCE="1")
    assert forced.returncode == 0, forced.stderr
    provenance = json.loads((scratch / "results" / "runs" / "fashion_mnist" / "provenance.json").read_text())
    assert provenance["git_dirty"] is True


def test_refuses_an_out_folder_that_holds_runs(scratch):
    (scratch / "runs" / "fashion_mnist" / "swav").mkdir(parents=True)
    done = run_script(scratch)
    assert done.returncode == 2 and "OUT=runs/fashion_mnist is not empty" in done.stderr
    assert not (scratch / "results").exists()
