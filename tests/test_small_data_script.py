"""scripts/small_data.sh's bookkeeping, with the stand-in Python of test_fashion_mnist_script.py (the real runs take
most of an hour): what it keeps in results/runs/small_data/, the tables it asks collect_results.py for, and its
refusals of a tree with uncommitted changes (unless FORCE=1) and of a non-empty OUT."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT
from test_fashion_mnist_script import FAKE_PYTHON, files_below, git

RUNS = [f"{method}_{data}" for data in ("fm_4000", "fm_8000", "digits") for method in ("swav", "unmix")]
PIXELS = [f"pixels_{data}" for data in ("fm_4000", "fm_8000", "digits")]


@pytest.fixture
def scratch(tmp_path) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "small_data.sh", repo / "scripts")
    shutil.copytree(ROOT / "scripts" / "lib", repo / "scripts" / "lib")
    (repo / ".gitignore").write_text("/runs/\n")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "scratch")
    return repo


def run_script(repo: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "scripts" / "small_data.sh")], capture_output=True, text=True,
                          env={**os.environ, "PY": str(repo.parent / "python"), **env}, timeout=120)


def test_keeps_every_run_and_baseline_and_builds_one_study_table(scratch):
    done = run_script(scratch)
    assert done.returncode == 0, done.stderr
    kept = scratch / "results" / "runs" / "small_data"
    expected = {f"{run}/{name}" for run in RUNS for name in ("config.yaml", "train_log.jsonl", "metrics.jsonl",
                                                            "output.log", "train_wall_seconds")}
    expected |= {f"{pixels}/{name}" for pixels in PIXELS for name in ("metrics.jsonl", "output.log")}
    assert files_below(kept) == expected | {"provenance.json"}
    # three evaluations per run and per baseline: kNN at k=20 and k=200, k-means
    for folder in RUNS + PIXELS:
        assert len((kept / folder / "metrics.jsonl").read_text().splitlines()) == 3, folder
    assert (kept / "swav_fm_4000" / "output.log").read_text().splitlines()[0] == "trained runs/small_data/swav_fm_4000"
    provenance = json.loads((kept / "provenance.json").read_text())
    assert (provenance["git_commit"], provenance["git_dirty"]) == (git(scratch, "rev-parse", "HEAD"), False)
    args = (scratch / "collect_results.args").read_text().split()
    assert args == ["--root", "results/runs/small_data", "--out", "results/small_data", "--combined",
                    "results/small_data.md", "--published"]  # the stand-in's $* drops the empty value


def test_refuses_uncommitted_changes_unless_forced(scratch):
    with open(scratch / "scripts" / "small_data.sh", "a") as handle:
        handle.write("# changed\n")
    done = run_script(scratch)
    assert done.returncode == 2 and not (scratch / "runs").exists() and not (scratch / "results").exists()
    assert done.stderr.startswith("small_data.sh: error: 1 tracked file(s) differ from commit ")
    assert "FORCE=1" in done.stderr and len(done.stderr.splitlines()) == 1
    forced = run_script(scratch, FORCE="1")
    assert forced.returncode == 0, forced.stderr
    provenance = json.loads((scratch / "results" / "runs" / "small_data" / "provenance.json").read_text())
    assert provenance["git_dirty"] is True


def test_refuses_an_out_folder_that_holds_runs(scratch):
    (scratch / "runs" / "small_data" / "swav_fm_4000").mkdir(parents=True)
    done = run_script(scratch)
    assert done.returncode == 2 and "OUT=runs/small_data is not empty" in done.stderr
    assert not (scratch / "results").exists()


TRY_A = ["--config", "configs/swav_fashion_mnist.yaml", "--dataset", "imagefolder", "--batch_size", "128",
         "--epochs", "60", "--warmup_epochs", "5", "--nmb_prototypes", "30", "--freeze_prototypes_epochs", "1"]
TRY_B = [*TRY_A, "--nmb_crops", "2", "4", "--size_crops", "20", "12", "--min_scale_crops", "0.3", "0.1",
         "--max_scale_crops", "1.0", "0.4"]
TRY_F = [*TRY_B, "--epochs", "120"]


@pytest.mark.parametrize("recipe, measured", [
    ("swav_small", TRY_F),
    ("unmix_small", [*TRY_A, "--method", "unmix", "--unmix_prob", "0.5", "--unmix_beta", "1.0",
                     "--unmix_mode", "faithful", "--epochs", "120"]),
])
def test_the_small_recipes_are_the_tries_their_headers_report(recipe, measured, monkeypatch):
    """swav_small.yaml resolves to try F of scripts/small_data_tries.sh (B for 120 epochs), unmix_small.yaml to try A
    plus the mixtures for 120 epochs (the flags those command lines give), every flag alike."""
    from conftest import entry_module

    monkeypatch.chdir(ROOT)
    parse = entry_module("main_pretrain").parse_args
    ours = vars(parse(["--config", f"configs/{recipe}.yaml", "--output_dir", "unused"]))
    tried = vars(parse([*measured, "--output_dir", "unused"]))
    differing = {key: (ours.get(key), tried.get(key)) for key in set(ours) | set(tried)
                 if key != "config" and ours.get(key) != tried.get(key)}
    assert not differing
