"""launch.py without a cluster: the plan, grid validation, shell safety of generated scripts, sbatch/ up to date."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clusterlab.slurm.grid import load_grid, run_name
from clusterlab.slurm.sbatch import recipe_scripts

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "g", "program": "main_pretrain.py", "config": "configs/swav_digits.yaml",
        "axes": {"epochs": [1, 2], "seed": [0]}, "flags": {"method": "swav", "dataset": "digits", "width": 4}}


def run_launch(*args):
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)


def grid_file(tmp_path, **changes) -> Path:
    spec = {**BASE, **changes}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_dry_run_prints_plan_and_submits_nothing(tmp_path):
    out = run_launch("--grid", str(grid_file(tmp_path)), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split() == ["run", "state", "epochs", "seed", "evaluation", "jobs"]
    assert [line.split()[:2] for line in lines[3:]] == [["swav_digits_1ep_s0", "new"], ["swav_digits_2ep_s0", "new"]]
    assert "submitted" not in out.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("changes, named", [
    ({"axes": {"epochs": [1], "colour": [1]}}, "'colour'"),
    ({"axes": {"epochs": []}}, "'epochs'"),
    ({"axes": {"epochs": ["many"]}}, "'epochs'"),
    ({"flags": {"width": [4, 8]}}, "'width'"),
    ({"flags": {"dataset": "mnist"}}, "'dataset'"),
    ({"resourcez": {}}, "'resourcez'"),
    ({"resources": {"gpus": 1}}, "'gpus'"),
    ({"resources": {"mem_gb": "lots"}}, "mem_gb"),
    ({"evals": {"programs": ["eval_knn.py"], "flags": {"eval_knn.py": {"kk": 3}}}}, "'kk'"),
    ({"evals": {"programs": ["eval_foo.py"]}}, "'eval_foo.py'"),
])
def test_bad_grid_fails_before_submitting_and_names_the_key(tmp_path, changes, named):
    out = run_launch("--grid", str(grid_file(tmp_path, **changes)), "--output_root", str(tmp_path / "runs"))
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert named in out.stderr
    assert not (tmp_path / "runs").exists()


def test_run_names_are_stable_readable_and_safe():
    assert run_name({"method": "swav", "dataset": "digits", "epochs": 100, "seed": 0},
                    ["method", "epochs", "seed"]) == "swav_digits_100ep_s0"
    assert run_name({"method": "swav", "dataset": "d", "lr": 0.6}, ["lr"]) == "swav_d_lr0.6"
    hostile = run_name({"method": "swav", "dataset": "d", "arch": "a b'; $(rm -rf ~)"}, ["arch"])
    assert all(ch.isalnum() or ch in "._+=-" for ch in hostile)


HOSTILE = "a b'\"; $(touch PWNED) `touch PWNED2` ${HOME}"


def test_hostile_grid_values_cannot_inject_shell(tmp_path):
    """A value full of quotes and substitutions reaches the program as one literal argument."""
    grid = grid_file(tmp_path, flags={**BASE["flags"], "train_split": HOSTILE},
                     evals={"programs": ["eval_knn.py"], "flags": {"eval_knn.py": {"data_path": HOSTILE}}})
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--emit-sbatch",
                     "--sbatch_dir", str(tmp_path / "scripts"))
    assert out.returncode == 0, out.stderr
    scripts = sorted((tmp_path / "scripts").glob("*.sh"))
    assert len(scripts) == 2
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # stand-ins for srun and the program: record every argument, one per line, and succeed
    srun = fake_bin / "srun"
    srun.write_text('#!/bin/bash\nfor a in "$@"; do printf "%s\\n" "$a"; done >> "$RECORD"\necho "--" >> "$RECORD"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "work"
    work.mkdir()
    record = tmp_path / "argv.txt"
    done = subprocess.run(["bash", str(scripts[0])], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "RECORD": str(record),
                               "EXPERIMENT_PATH": str(tmp_path / "exp"), "SLURM_JOB_ID": "1"})
    assert done.returncode == 0, done.stderr
    argv = record.read_text().split("\n")
    assert argv.count(HOSTILE) == 2  # training's --train_split and eval_knn's --data_path
    assert argv[argv.index("--train_split") + 1] == HOSTILE
    assert not any(p.name.startswith("PWNED") for p in [*work.iterdir(), *tmp_path.iterdir()])


def test_sbatch_folder_matches_the_recipes(tmp_path):
    """sbatch/ is generated from configs/recipes.yaml; regenerate with `python launch.py --emit-sbatch`."""
    expected = recipe_scripts(ROOT / "configs" / "recipes.yaml", ROOT)
    present = {p.stem: p.read_text() for p in (ROOT / "sbatch").glob("*.sh")}
    assert sorted(present) == sorted(expected), "sbatch/ and configs/recipes.yaml list different scripts"
    for name, text in expected.items():
        assert present[name] == text, f"sbatch/{name}.sh is stale: run `python launch.py --emit-sbatch`"


def test_grid_evaluations_follow_checkpoint_epochs(tmp_path):
    grid = load_grid(grid_file(tmp_path, axes={"epochs": [4]}, evals={"programs": ["eval_knn.py"],
                                                                     "epochs": [2, 4, 6, "final"]}),
                     tmp_path / "runs", ROOT)
    run = grid.runs[0]
    assert run.flags["checkpoint_epochs"] == [2, 4]  # 6 is past the run's 4 epochs
    assert [e.checkpoint for e in run.evals] == ["checkpoint_ep0002.pth", "checkpoint_ep0004.pth", "checkpoint.pth"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "grids").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_grid_expands_into_valid_runs(path, tmp_path):
    """Each grid in configs/grids/ loads (every flag checked against its program) into distinctly named runs."""
    grid = load_grid(path, output_root=tmp_path)
    names = [run.name for run in grid.runs]
    assert names and len(set(names)) == len(names)
    assert all(run.program in ("main_pretrain.py", "main_cluster.py") for run in grid.runs)
