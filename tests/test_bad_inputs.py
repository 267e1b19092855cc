"""A catalogue of bad inputs across the entry points: grids, recipes (sbatch generation) and data files.

Each case builds its input under its own temporary folder and runs the entry script's main under run_cli in this
process (what `python SCRIPT` runs); it must exit with status 2 and one stderr line `SCRIPT: error: ...` holding the
words listed (the bad value, and what would be valid), with no traceback, and leave every file that existed before
byte-identical, with nothing new: the case's folder (also the working directory) and the repository's configs/,
sbatch/ and results/ are hashed before and after. No case may run a command it smuggles in (a PWNED file).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import yaml

import fabricate
from conftest import CONFIG, ROOT, TINY, assert_user_error, snapshot  # CONFIG: absolute, the cases run elsewhere

WATCHED = [ROOT / "configs", ROOT / "sbatch", ROOT / "results"]
GRID = {"name": "g", "program": "main_pretrain.py", "config": CONFIG,
        "axes": {"epochs": [1, 2], "seed": [0]}, "flags": {"method": "swav", "dataset": "digits", "width": 4}}
PIPELINE = {"name": "p", "axes": {"seed": [0]}, "flags": {"dataset": "digits", "width": 4},
            "stages": [{"name": "superand", "flags": {"method": "superand"}},
                       {"name": "embedul", "program": "main_cluster.py", "flags": {"method": "embedul"},
                        "pretrained_from": "superand"}]}
RECIPE = {"config": CONFIG, "evals": ["eval_knn.py"], "resources": {"mem_gb": 4}}


def grid(tmp: Path, base: dict = GRID, **changes) -> list:
    """launch.py --dry-run on a grid file: a bad grid must be refused before the plan, with or without Slurm."""
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump({**base, **changes}, sort_keys=False))
    return ["--grid", path, "--output_root", tmp / "runs", "--dry-run"]


def recipes(tmp: Path, name: str = "r", **changes) -> list:
    """launch.py --emit-sbatch on a recipe file holding one recipe."""
    path = tmp / "recipes.yaml"
    path.write_text(yaml.safe_dump({name: {**RECIPE, **changes}}, sort_keys=False))
    return ["--emit-sbatch", "--recipes", path, "--sbatch_dir", tmp / "scripts"]


class RunsACommand:
    """Pickles as a call of os.system: what a crafted CIFAR batch holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def cifar10_running(tmp: Path, file: str) -> Path:
    """Fabricated CIFAR-10 whose `file` runs `touch PWNED` when plain pickle.load reads it."""
    fabricate.make_cifar10(tmp / "data", n_train=10, n_test=5)
    with open(tmp / "data" / "cifar-10-batches-py" / file, "wb") as handle:
        pickle.dump({"data": RunsACommand(f"touch {tmp / 'PWNED'}"), "labels": [0]}, handle, protocol=2)
    return tmp / "data"


SYSTEM = f"{os.system.__module__}.system"
LETTERS = "may hold only letters, digits and _.- (starting with a letter or digit)"
CASES = [
    # grids: keys, axes, flags
    ("launch.py", lambda t: grid(t, axes={"epochs": [1], "colour": [1]}), ["'colour'"], "grid-unknown-axis-flag"),
    ("launch.py", lambda t: grid(t, axes={"epochs": []}), ["'epochs'", "non-empty list"], "grid-empty-axis"),
    ("launch.py", lambda t: grid(t, axes={"epochs": ["many"]}), ["'epochs'", "'many'"], "grid-axis-wrong-type"),
    ("launch.py", lambda t: grid(t, flags={**GRID["flags"], "width": [4, 8]}), ["'width'"], "grid-flag-list"),
    ("launch.py", lambda t: grid(t, flags={**GRID["flags"], "dataset": "mnist"}), ["'dataset'", "'mnist'"],
     "grid-unknown-dataset"),
    ("launch.py", lambda t: grid(t, resourcez={}), ["'resourcez'", "valid:"], "grid-unknown-key"),
    ("launch.py", lambda t: grid(t, config="configs/nosuch.yaml"),
     ["config 'configs/nosuch.yaml' does not exist", "current directory", "grid.yaml"], "grid-config-missing"),
    ("launch.py", lambda t: recipes(t, config="configs/nosuch.yaml"),
     ["config 'configs/nosuch.yaml' does not exist", "current directory", "recipes.yaml"], "recipe-config-missing"),
    ("launch.py", lambda t: grid(t, evals={"programs": ["eval_knn.py"], "flags": {"eval_knn.py": {"kk": 3}}}),
     ["'kk'"], "grid-unknown-eval-flag"),
    ("launch.py", lambda t: grid(t, evals={"programs": ["eval_foo.py"]}), ["'eval_foo.py'", "eval_knn.py"],
     "grid-unknown-eval-program"),
    # grids: resources that Slurm would refuse, or that could smuggle a line into a generated script
    ("launch.py", lambda t: grid(t, resources={"gpus": 1}), ["resources.'gpus'", "gpus_per_node"],
     "resources-unknown-key"),
    ("launch.py", lambda t: grid(t, resources={"mem_gb": -4}), ["resources.mem_gb = -4", "integer >= 1"],
     "resources-negative-memory"),
    ("launch.py", lambda t: grid(t, resources={"mem_gb": "lots"}), ["resources.mem_gb = 'lots'", "integer >= 1"],
     "resources-memory-text"),
    ("launch.py", lambda t: grid(t, resources={"nodes": 0}), ["resources.nodes = 0", "integer >= 1"],
     "resources-zero-nodes"),
    ("launch.py", lambda t: grid(t, resources={"cpus_per_task": 1.5}), ["resources.cpus_per_task = 1.5"],
     "resources-fractional-cpus"),
    ("launch.py", lambda t: grid(t, resources={"gpus_per_node": True}), ["resources.gpus_per_node = True"],
     "resources-boolean-gpus"),
    ("launch.py", lambda t: grid(t, resources={"timeout_min": "1h"}), ["resources.timeout_min = '1h'"],
     "resources-time-text"),
    ("launch.py", lambda t: grid(t, resources={"max_requeues": -1}), ["resources.max_requeues = -1",
                                                                       "integer >= 0"], "resources-negative-requeues"),
    ("launch.py", lambda t: grid(t, eval_resources={"array_parallelism": 0}),
     ["eval_resources.array_parallelism = 0"], "eval-resources-zero-parallelism"),
    ("launch.py", lambda t: grid(t, resources={"partition": "gpu x"}), ["resources.partition = 'gpu x'",
                                                                         "Slurm name"], "resources-partition-space"),
    ("launch.py", lambda t: grid(t, resources={"account": "a\n#SBATCH --wrap=x"}),
     ["resources.account = 'a\\n#SBATCH --wrap=x'", "Slurm name"], "resources-account-newline"),
    # grids: names that become directories, job names and shell words
    ("launch.py", lambda t: grid(t, name="../escape"), ["name '../escape'", LETTERS], "grid-name-parent"),
    ("launch.py", lambda t: grid(t, name="a$(touch PWNED)"), ["name 'a$(touch PWNED)'", LETTERS],
     "grid-name-substitution"),
    ("launch.py", lambda t: grid(t, PIPELINE, stages=[{**PIPELINE["stages"][0], "name": "super-and"},
                                                      {**PIPELINE["stages"][1], "pretrained_from": "super-and"}]),
     ["stage name 'super-and'", "letters, digits and _ (starting with a letter)"], "grid-stage-name-dash"),
    # recipes (launch.py --emit-sbatch)
    ("launch.py", lambda t: recipes(t, "inj$(touch PWNED)x"), ["recipe name 'inj$(touch PWNED)x'", LETTERS],
     "recipe-name-substitution"),
    ("launch.py", lambda t: recipes(t, "a/b"), ["recipe name 'a/b'", LETTERS], "recipe-name-slash"),
    ("launch.py", lambda t: recipes(t, ".."), ["recipe name '..'", LETTERS], "recipe-name-dots"),
    ("launch.py", lambda t: recipes(t, "x y"), ["recipe name 'x y'", LETTERS], "recipe-name-space"),
    ("launch.py", lambda t: recipes(t, "swav_{epochs}ep"), ["recipe name 'swav_{epochs}ep'", LETTERS],
     "recipe-epochs-name-without-epochs"),
    ("launch.py", lambda t: recipes(t, resources={"mem_gb": -4}), ["resources.mem_gb = -4"],
     "recipe-negative-memory"),
    ("launch.py", lambda t: recipes(t, resources={"qos": "high; touch PWNED"}), ["resources.qos = 'high; touch PWNED'"],
     "recipe-qos-command"),
    ("launch.py", lambda t: recipes(t, config=None, evals=[], stages=[
        {"name": "first stage", "config": CONFIG}, {"name": "second", "config": CONFIG}]),
     ["stage name 'first stage'", "letters, digits and _ (starting with a letter)"], "recipe-stage-name-space"),
    # CIFAR batches that would run a command when unpickled
    ("main_pretrain.py", lambda t: [*TINY, "--dataset", "cifar10", "--data_path", cifar10_running(t, "data_batch_1"),
                                    "--output_dir", t / "run"],
     ["data_batch_1", SYSTEM, "refused, nothing was run"], "cifar-train-batch-runs-a-command"),
    ("eval_cluster.py", lambda t: ["--baseline", "pixels", "--dataset", "cifar10", "--data_path",
                                   cifar10_running(t, "test_batch"), "--output_dir", t / "pixels"],
     ["test_batch", SYSTEM, "refused"], "cifar-test-batch-runs-a-command"),
    ("main_pretrain.py", lambda t: [*TINY, "--dataset", "cifar10", "--data_path", cifar10_running(t, "batches.meta"),
                                    "--output_dir", t / "run"],
     ["batches.meta", SYSTEM, "refused"], "cifar-meta-runs-a-command"),
]


@pytest.mark.parametrize("script, build, words", [pytest.param(*case[:3], id=case[3]) for case in CASES])
def test_bad_input_is_refused_on_one_line_and_changes_nothing(run_in_process, monkeypatch, tmp_path, script, build,
                                                               words):
    argv = build(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = [snapshot(tmp_path), *map(snapshot, WATCHED)]
    result = run_in_process(script, *argv)
    assert_user_error(result, script, *words)
    assert [snapshot(tmp_path), *map(snapshot, WATCHED)] == before
    assert not list(tmp_path.rglob("PWNED*")) and not list(ROOT.glob("PWNED*"))

