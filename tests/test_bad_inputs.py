"""A catalogue of bad inputs across the entry points: grids, recipes (sbatch generation), data files, configs,
checkpoints and run directories, for all seven programs.

Each case builds its input under its own temporary folder and runs the entry script's main under run_cli in this
process (what `python SCRIPT` runs); it must exit with status 2 and one stderr line `SCRIPT: error: ...` holding the
words listed (the bad value, and what would be valid), with no traceback, and leave every file that existed before
byte-identical, with nothing new: the case's folder (also the working directory) and the repository's configs/,
sbatch/ and results/ are hashed before and after. No case may run a command it smuggles in (a PWNED file).
"""
from __future__ import annotations

import json
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import yaml

import fabricate
from clusterlab import checkpoint
# CONFIG: absolute, the cases run elsewhere
from conftest import CONFIG, ROOT, TINY, assert_ok, assert_user_error, copy_run, run_script, snapshot, write_fashion_mnist

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
    ("launch.py", lambda t: grid(t, axes={"epochs": [2, 2.0]}),
     ["runs 'swav_digits_2ep' and 'swav_digits_2.0ep' train with the same flags"], "grid-values-spelled-twice"),
    ("launch.py", lambda t: grid(t, flags={**GRID["flags"], "width": [4, 8]}), ["'width'"], "grid-flag-list"),
    ("launch.py", lambda t: grid(t, flags={**GRID["flags"], "dataset": "mnist"}), ["'dataset'", "'mnist'"],
     "grid-unknown-dataset"),
    ("launch.py", lambda t: grid(t, resourcez={}), ["'resourcez'", "valid:"], "grid-unknown-key"),
    ("launch.py", lambda t: ["--grid", t / "nosuch.yaml", "--dry-run"], ["grid file", "nosuch.yaml' does not exist"],
     "grid-missing"),
    ("launch.py", lambda t: ["--emit-sbatch", "--recipes", t, "--sbatch_dir", t / "scripts"],
     ["recipes file", "is a folder (give a YAML file, e.g. configs/recipes.yaml)"], "recipes-a-folder"),
    ("launch.py", lambda t: grid(t, config="configs/nosuch.yaml"),
     ["config 'configs/nosuch.yaml' does not exist", "current directory", "grid.yaml"], "grid-config-missing"),
    ("launch.py", lambda t: recipes(t, config="configs/nosuch.yaml"),
     ["config 'configs/nosuch.yaml' does not exist", "current directory", "recipes.yaml"], "recipe-config-missing"),
    # a TypeError traceback each, before
    ("launch.py", lambda t: grid(t, config=5), ["config 5 is not a file name"], "grid-config-a-number"),
    ("launch.py", lambda t: grid(t, flags={**GRID["flags"], "method": "swavv"}),
     ["grid.yaml", "method 'swavv' is not one of: embedul, npid"], "grid-misspelt-method"),
    ("launch.py", lambda t: recipes(t, config=5), ["config 5 is not a file name"], "recipe-config-a-number"),
    ("launch.py", lambda t: grid(t, PIPELINE, stages=5), ["`stages` must be a list of stages (got 5)"],
     "grid-stages-a-number"),
    ("launch.py", lambda t: grid(t, output_root=5), ["`output_root` must be a folder's path (got 5)"],
     "grid-output-root-a-number"),
    ("launch.py", lambda t: [*grid(t)[:3], a_file(t) / "runs", "--dry-run"],
     ["output root", "file' is a file, not a folder"], "grid-output-root-under-a-file"),
    ("launch.py", lambda t: [*grid(t)[:3], link_to_nowhere(t) / "runs", "--dry-run"],
     ["output root", "is a link to nowhere, not a folder"], "grid-output-root-under-a-link-to-nowhere"),
    ("launch.py", lambda t: grid(t, evals={"programs": ["eval_knn.py"], "flags": {"eval_knn.py": {"kk": 3}}}),
     ["'kk'"], "grid-unknown-eval-flag"),
    ("launch.py", lambda t: grid(t, evals={"programs": ["eval_foo.py"]}), ["'eval_foo.py'", "eval_knn.py"],
     "grid-unknown-eval-program"),
    ("launch.py", lambda t: grid(t, evals={"programs": "eval_knn.py"}),
     ["evals.programs must be a list", "eval_knn.py, ", "(got 'eval_knn.py')"], "grid-eval-programs-not-a-list"),
    # an empty list of epochs evaluated the final checkpoint; epochs without a program nothing, without a word
    ("launch.py", lambda t: grid(t, evals={"programs": ["eval_knn.py"], "epochs": []}),
     ["evals.epochs is empty: list the epochs to evaluate"], "grid-eval-epochs-empty"),
    ("launch.py", lambda t: grid(t, evals={"epochs": [1]}),
     ["evals.epochs [1] given, but evals.programs lists no program", "eval_knn.py"], "grid-eval-epochs-no-program"),
    ("launch.py", lambda t: grid(t, evals={"programs": ["eval_knn.py"], "flags": ["k"]}),
     ["evals.flags must be a mapping", "(got ['k'])"], "grid-eval-flags-not-a-mapping"),
    ("launch.py", lambda t: grid(t, evals={"programs": ["eval_cluster.py"],
                                           "flags": {"eval_cluster.py": ["clusters"]}}),
     ["evals.flags.eval_cluster.py must be a mapping", "(got ['clusters'])"], "grid-eval-program-flags-not-a-mapping"),
    ("launch.py", lambda t: grid(t, PIPELINE, stages=[{**PIPELINE["stages"][0], "flags": ["rounds"]},
                                                     PIPELINE["stages"][1]]),
     ["stage 'superand': `flags` must be a mapping", "(got ['rounds'])"], "grid-stage-flags-not-a-mapping"),
    ("launch.py", lambda t: grid(t, eval_resources=[1]), ["eval_resources must be a mapping"],
     "grid-eval-resources-not-a-mapping"),
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
    ("launch.py", lambda t: grid(t, resources={"gpus_per_node": 2, "tasks_per_node": 8}),
     ["resources.tasks_per_node = 8 with resources.gpus_per_node = 2", "tasks_per_node: 2"],
     "resources-tasks-share-gpus"),
    ("launch.py", lambda t: grid(t, eval_resources={"gpus_per_node": 4, "tasks_per_node": 1}),
     ["eval_resources.tasks_per_node = 1 with eval_resources.gpus_per_node = 4", "tasks_per_node: 4"],
     "eval-resources-idle-gpus"),
    ("launch.py", lambda t: grid(t, resources={"timeout_min": 2, "signal_delay_s": 120}),
     ["resources.signal_delay_s = 120", "below resources.timeout_min x 60 = 120 s"], "resources-signal-at-start"),
    ("launch.py", lambda t: grid(t, eval_resources={"timeout_min": 1}),
     ["eval_resources.signal_delay_s = 120", "below eval_resources.timeout_min x 60 = 60 s"],
     "eval-resources-signal-at-start"),
    # grids: a run's directory comes from output_root
    ("launch.py", lambda t: grid(t, flags={"output_dir": "/tmp/x"}), ["`output_dir` in flags", "output_root"],
     "grid-flags-output-dir"),
    ("launch.py", lambda t: grid(t, axes={"output_dir": ["/tmp/a", "/tmp/b"]}), ["`output_dir` in axes"],
     "grid-axes-output-dir"),
    ("launch.py", lambda t: grid(t, PIPELINE, stages=[{**PIPELINE["stages"][0], "flags": {"output_dir": "x"}},
                                                     PIPELINE["stages"][1]]), ["`output_dir` in stage flags"],
     "grid-stage-output-dir"),
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




def config_file(tmp: Path, **values) -> list:
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["--config", path, "--output_dir", tmp / "run"]


def cycle(tmp: Path) -> list:
    (tmp / "a.yaml").write_text("base: b.yaml\nwidth: 4\n")
    (tmp / "b.yaml").write_text("base: a.yaml\n")
    return ["--config", tmp / "a.yaml", "--output_dir", tmp / "run"]


def link_loop(tmp: Path) -> Path:
    (tmp / "one").symlink_to(tmp / "two")
    (tmp / "two").symlink_to(tmp / "one")
    return tmp / "one"


def foreign_config(tmp: Path) -> Path:
    """A folder of the user's own, with a config.yaml of its own (training replaced it)."""
    (tmp / "mine").mkdir()
    (tmp / "mine" / "config.yaml").write_text("my: precious\n")
    return tmp / "mine"


def link_to_nowhere(tmp: Path) -> Path:
    (tmp / "share").symlink_to("/nonexistent/share")
    return tmp / "share"


def a_file(tmp: Path) -> Path:
    (tmp / "file").write_text("not a directory\n")
    return tmp / "file"


CASES += [
    # configuration files
    ("main_pretrain.py", lambda t: ["--config", t / "missing.yaml"], ["missing.yaml", "does not exist"],
     "config-missing"),
    ("main_pretrain.py", lambda t: config_file(t, widht=4), ["unknown key 'widht'"], "config-unknown-key"),
    ("main_pretrain.py", lambda t: config_file(t, width="four"), ["'width'", "'four'"], "config-wrong-type"),
    ("main_cluster.py", lambda t: config_file(t, method="sela", hc=2.5), ["2.5"], "config-float-for-int"),
    ("main_pretrain.py", cycle, ["makes a cycle"], "config-base-cycle"),
    ("main_pretrain.py", lambda t: [*TINY, "--amp", "fp32"], ["--amp", "'fp32'", "choose from"], "flag-amp-choice"),
    ("main_cluster.py", lambda t: ["--method", "sela", "--hc", "0"], ["--hc", "'0'"], "flag-zero-heads"),
    # a folder no file system lets one make: a traceback ending in FileNotFoundError
    ("main_pretrain.py", lambda t: [*TINY, "--output_dir", "/proc/clusterlab_run"],
     ["cannot create the run directory '/proc/clusterlab_run'", "use another --output_dir"], "output-dir-uncreatable"),
    # a crop count typed with extra digits ran out of memory with a traceback (sizes have had a bound)
    ("main_pretrain.py", lambda t: [*TINY, "--nmb_crops", "20000", "--output_dir", t / "run"],
     ["--nmb_crops 20000 is 20000 crops of each image", "at most 64"], "flag-crops-countless"),
    # a head of one class trained to losses of 0 and "finished"
    ("main_cluster.py", lambda t: ["--method", "sela", "--head_classes", "1"],
     ["--head_classes", "'1' classes: a head needs 2 or more"], "flag-one-class-head"),
    ("main_cluster.py", lambda t: ["--method", "scan", "--head_classes", "1"],
     ["--head_classes", "'1' classes: a head needs 2 or more (or 0: the dataset's)"], "flag-one-class-head-scan"),
    # one prototype: every image the same code, a loss of 0 at every step, "finished"
    ("main_pretrain.py", lambda t: [*TINY, "--nmb_prototypes", "1", "--output_dir", t / "run"],
     ["--nmb_prototypes", "'1' prototypes: a swapped prediction needs 2 or more"], "flag-one-prototype"),
    ("main_pretrain.py", lambda t: [*TINY, "--device", "cuda", "--output_dir", t / "run"],
     ["--device cuda", "no CUDA device"], "device-without-cuda"),
    # data
    ("main_pretrain.py", lambda t: [*TINY, "--dataset", "cifar10", "--data_path", t / "nowhere", "--output_dir",
                                    t / "run"], ["nowhere'", "does not exist"], "data-path-missing"),
    ("main_pretrain.py", lambda t: [*TINY, "--dataset", "fashion_mnist", "--data_path",
                                    write_fashion_mnist(t / "fm", cut=100), "--output_dir", t / "run"],
     ["train-images-idx3-ubyte"], "data-idx-truncated"),
    ("collect_results.py", lambda t: ["--root", t / "nothing", "--out", t / "tables"], ["--root", "nothing"],
     "collect-root-missing"),
    # run directories
    ("main_pretrain.py", lambda t: [*TINY, "--output_dir", a_file(t)], ["is a file"], "output-dir-is-a-file"),
    ("main_pretrain.py", lambda t: [*TINY, "--output_dir", t / ("a" * 300)], ["File name too long", "shorter path"],
     "output-dir-name-too-long"),
    ("main_pretrain.py", lambda t: [*TINY, "--output_dir", link_loop(t) / "run"],
     ["Too many levels of symbolic links", "lead in a circle"], "output-dir-in-a-link-loop"),
    ("main_pretrain.py", lambda t: [*TINY, "--output_dir", foreign_config(t)],
     ["holds a config.yaml that is not a run's", "use another --output_dir"], "output-dir-holds-a-foreign-config"),
    ("eval_knn.py", lambda t: ["--run", t / "nothing", "--device", "cpu"], ["--run", "nothing"], "eval-run-missing"),
    ("eval_linear.py", lambda t: ["--run", a_file(t).parent, "--device", "cpu"], ["no config.yaml"],
     "eval-not-a-run"),
    ("main_pretrain.py", lambda t: [*TINY, "--knn_monitor_every", 1, "--knn_monitor_features", "memory_bank",
                                    "--output_dir", t / "run"],
     ["--knn_monitor_features memory_bank", "swav keeps no memory bank"], "monitor-bank-without-bank"),
    # a run's flags given to the pixel baseline (they were dropped without a word)
    ("eval_cluster.py", lambda t: ["--baseline", "pixels", "--dataset", "digits", "--output_dir", t / "pixels",
                                   "--assignment", "heads"], ["--assignment 'heads'", "leave it out"],
     "baseline-heads"),
    ("eval_knn.py", lambda t: ["--baseline", "pixels", "--dataset", "digits", "--output_dir", t / "pixels",
                               "--features", "embedding"], ["--features 'embedding'", "leave it out"],
     "baseline-embedding"),
    ("eval_knn.py", lambda t: ["--baseline", "pixels", "--dataset", "digits", "--output_dir", t / "pixels",
                               "--checkpoint", "checkpoint_ep0002.pth"], ["--checkpoint 'checkpoint_ep0002.pth'"],
     "baseline-checkpoint"),
    ("eval_knn.py", lambda t: ["--baseline", "pixels", "--dataset", "digits", "--output_dir", t / "pixels",
                               "--train_features", "memory_bank", "--features", "embedding"],
     ["--train_features memory_bank", "raw pixels have no memory bank", "recomputed"], "baseline-memory-bank"),
    ("eval_cluster.py", lambda t: ["--baseline", "pixels", "--dataset", "digits", "--output_dir", t / "pixels",
                                   "--eval_crop", 3000], ["--eval_crop 3000", "at most 64"],
     "baseline-crop-oversized"),
    # (a baseline names its data: it was scored again, and recorded again, every time)
    ("eval_knn.py", lambda t: ["--baseline", "pixels", "--dataset", "digits", "--output_dir", t / "pixels",
                               "--skip_recorded", "true"], ["--skip_recorded 'true'", "leave it out"],
     "baseline-skip-recorded"),
]


def truncated(run: Path) -> None:
    data = (run / "checkpoint.pth").read_bytes()
    (run / "checkpoint.pth").write_bytes(data[: len(data) // 2])


def foreign(run: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(2)}}, run / "checkpoint.pth")


def malicious(run: Path) -> None:
    with open(run / "checkpoint.pth", "wb") as handle:
        # protocol 2, the one torch.save writes: torch warns about any other before refusing
        pickle.dump(RunsACommand(f"touch {run / 'PWNED'}"), handle, protocol=2)


def metrics_a_folder(run: Path) -> None:
    (run / "metrics.jsonl").unlink(missing_ok=True)
    (run / "metrics.jsonl").mkdir()


def three_channel_stem(run: Path) -> None:
    """The run's first convolution as if it had been trained on colour images."""
    state = checkpoint.load(run / "checkpoint.pth")
    tags = {key: state.pop(key) for key in ("format", "schema", "kind", "method")}
    state["model"]["backbone.conv1.weight"] = state["model"]["backbone.conv1.weight"].repeat(1, 3, 1, 1)
    checkpoint.save(state, run / "checkpoint.pth", kind=tags["kind"], method=tags["method"])


def interrupted(run: Path) -> None:
    (run / "status.json").write_text(json.dumps({"state": "interrupted", "epoch": 1, "step": 3}) + "\n")


def colour_normalisation(run: Path) -> None:
    """The run's checkpoint as if it had been trained on 3-channel images."""
    state = checkpoint.load(run / "checkpoint.pth")
    tags = {key: state.pop(key) for key in ("format", "schema", "kind", "method")}
    state["data_info"].update(channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    checkpoint.save(state, run / "checkpoint.pth", kind=tags["kind"], method=tags["method"])


def locked(run: Path) -> None:
    holder = {"host": socket.gethostname(), "pid": os.getppid(), "slurm_job_id": None, "since": "now"}
    (run / ".lock").write_text(json.dumps(holder))


def probe_locked(run: Path) -> None:
    """The folder of `eval_linear.py --run RUN --epochs 1 --cached_features true` held by another process."""
    (run / "linear_ep0002_cached_epochs1").mkdir()
    locked(run / "linear_ep0002_cached_epochs1")


TRAIN = [*TINY, "--epochs", 2]
RUN_CASES = [  # (script, change the run, arguments with RUN for the run's folder, words, id)
    ("eval_knn.py", None, ["--run", "RUN", "--checkpoint", "checkpoint_ep0009.pth"],
     ["checkpoint_ep0009.pth", "does not exist"], "checkpoint-missing"),
    ("eval_knn.py", truncated, ["--run", "RUN"], ["checkpoint.pth", "corrupt or not a torch file"],
     "checkpoint-truncated"),
    ("eval_cluster.py", foreign, ["--run", "RUN"], ["not a clusterlab checkpoint"], "checkpoint-foreign"),
    ("eval_linear.py", malicious, ["--run", "RUN"], ["weights_only refused it"], "checkpoint-runs-a-command"),
    ("main_pretrain.py", malicious, [*TRAIN, "--output_dir", "RUN"], ["weights_only refused it"],
     "resume-checkpoint-runs-a-command"),
    ("main_pretrain.py", None, [*TINY, "--batch_size", 32, "--output_dir", "RUN"],
     ["was trained with --batch_size 64", "32"], "resume-other-batch"),
    ("main_pretrain.py", None, [*TINY, "--epochs", 1, "--output_dir", "RUN"],
     ["--epochs 1: ", "checkpoint.pth is already at the end of epoch 2", "--epochs 2 or more"], "resume-fewer-epochs"),
    ("main_cluster.py", None, ["--method", "sela", "--dataset", "digits", "--width", 4, "--device", "cpu",
                               "--output_dir", "RUN"], ["is a 'pretrain' checkpoint", "expected cluster"],
     "resume-other-program"),
    ("main_cluster.py", None, ["--method", "embedul", "--dataset", "digits", "--width", 4, "--device", "cpu",
                               "--pretrained", "RUN/checkpoint_ep0007.pth", "--output_dir", "NEW"],
     ["checkpoint_ep0007.pth"], "pretrained-missing"),
    ("main_cluster.py", three_channel_stem, ["--method", "scan", "--dataset", "digits", "--width", 4, "--device",
                                             "cpu", "--pretrained", "RUN", "--output_dir", "NEW"],
     ["its 'backbone' does not fit this model", "size mismatch for conv1.weight"], "pretrained-other-channels"),
    ("main_cluster.py", colour_normalisation, ["--method", "scan", "--dataset", "digits", "--width", 4, "--device",
                                               "cpu", "--pretrained", "RUN", "--output_dir", "NEW"],
     ["was trained on images of 3 channel(s)", "digits has 1"], "pretrained-colour-for-grey"),
    ("main_cluster.py", interrupted, ["--method", "scan", "--dataset", "digits", "--width", 4, "--device", "cpu",
                                      "--pretrained", "RUN", "--output_dir", "NEW"],
     ["has not finished training (status 'interrupted' at epoch 2 step 3)", "name one of its checkpoint files"],
     "pretrained-unfinished"),
    ("main_pretrain.py", locked, [*TRAIN, "--output_dir", "RUN"], ["is in use by pid", "another --output_dir"],
     "run-locked"),
    # (its advice was "use another --output_dir", a flag eval_linear.py does not have)
    ("eval_linear.py", probe_locked, ["--run", "RUN", "--epochs", 1, "--cached_features", "true", "--device", "cpu"],
     ["linear_ep0002_cached_epochs1' is in use by pid", "wait for it, stop it, or probe with other flags"],
     "probe-locked"),
    ("eval_linear.py", None, ["--run", "RUN", "--eval_resize", 16, "--device", "cpu"],
     ["--eval_resize 16", "digits is seen whole", "leave it out"], "eval-resize-in-memory"),
    ("eval_knn.py", metrics_a_folder, ["--run", "RUN", "--k", 5, "--device", "cpu"],
     ["cannot write", "metrics.jsonl", "that path is a folder"], "eval-metrics-a-folder"),
    ("eval_cluster.py", None, ["--run", "RUN", "--clusters", 5000, "--device", "cpu"],
     ["--clusters 5000", "more than the 898 images"], "eval-too-many-clusters"),
    # (without --features embedding too: it asked for that flag first, then refused the method)
    ("eval_knn.py", None, ["--run", "RUN", "--train_features", "memory_bank"],
     ["--train_features memory_bank", "keeps no memory bank"], "eval-no-memory-bank"),
    ("eval_cluster.py", None, ["--run", "RUN", "--assignment", "heads", "--device", "cpu"],
     ["--assignment heads", "method 'swav' has no heads", "--assignment kmeans"], "eval-heads-without-heads"),
    ("eval_linear.py", None, ["--run", "RUN", "--cached_features", "true", "--channels_last", "--device", "cpu"],
     ["--channels_last does nothing with --cached_features true", "--cached_features false"],
     "linear-cached-channels-last"),
    # a traceback of a failed allocation, or killed by the kernel without a word
    ("eval_knn.py", None, ["--run", "RUN", "--eval_crop", 100000, "--device", "cpu"],
     ["--eval_crop 100000", "more than 8 times the images' 8 px", "at most 64"], "eval-crop-oversized"),
    ("main_pretrain.py", None, [*TRAIN, "--size_crops", 3000, "--output_dir", "NEW"],
     ["--size_crops 3000", "more than 8 times the images' 8 px", "at most 64"], "pretrain-crop-oversized"),
    ("main_cluster.py", None, ["--method", "scan", "--dataset", "digits", "--width", 4, "--device", "cpu",
                               "--pretrained", "RUN", "--mining_crop", 3000, "--output_dir", "NEW"],
     ["--mining_crop 3000", "at most 64"], "scan-mining-crop-oversized"),
    # trained the cosine schedule, while the record and the probe's folder named the drops
    ("eval_linear.py", None, ["--run", "RUN", "--lr_drops", 1, "--device", "cpu"],
     ["--lr_drops 1 does nothing in this probe", "applies to --schedule step"], "linear-drops-without-step"),
    ("main_pretrain.py", None, [*TRAIN, "--lr_drops", 1, "--output_dir", "NEW"],
     ["--lr_drops 1 does nothing in this run", "applies to --schedule step"], "pretrain-drops-without-step"),
]


@pytest.mark.parametrize("script, change, argv, words", [pytest.param(*case[:4], id=case[4]) for case in RUN_CASES])
def test_bad_input_about_a_run_is_refused_on_one_line_and_changes_nothing(run_in_process, monkeypatch, tmp_path,
                                                                          tiny_run, script, change, argv, words):
    run = copy_run(tiny_run, tmp_path / "run")
    if change is not None:
        change(run)
    argv = [str(a).replace("RUN", str(run)).replace("NEW", str(tmp_path / "new")) for a in argv]
    monkeypatch.chdir(tmp_path)
    before = [snapshot(tmp_path), *map(snapshot, WATCHED)]
    result = run_in_process(script, *argv)
    assert_user_error(result, script, *words)
    assert [snapshot(tmp_path), *map(snapshot, WATCHED)] == before
    assert not list(tmp_path.rglob("PWNED*"))


def test_the_catalogue_covers_every_program_with_forty_inputs_or_more():
    from clusterlab.programs import PROGRAMS

    cases = CASES + RUN_CASES
    assert len(cases) >= 40
    assert {case[0] for case in cases} >= {"main_pretrain.py", "main_cluster.py", "eval_knn.py", "eval_linear.py",
                                           "eval_cluster.py", "launch.py", "collect_results.py"} | set(PROGRAMS)


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


@pytest.mark.parametrize("method", ["sela", "scan"])
def test_a_batch_norm_given_one_value_per_channel_is_one_line(tmp_path, method):
    """One image per process: batch norm's ValueError at the first step was a traceback. Not refused ahead: SwAV
    stacks its crops and trains with it."""
    result = run_script("main_cluster.py", "--method", method, "--dataset", "digits", "--width", 4, "--device", "cpu",
                        "--batch_size", 1, "--epochs", 1, "--output_dir", tmp_path / "run")
    assert_user_error(result, "main_cluster.py", "--batch_size 1", "one value per channel", "larger --batch_size")


@pytest.mark.slow
def test_a_second_stage_resumed_on_other_images_names_its_own_run_not_the_pretrained_one(run_in_process, tiny_run,
                                                                                           tmp_path):
    """Resuming reads the run's own checkpoint, not --pretrained's: a training set of another number of channels is
    refused as a change of --dataset of that run (the message blamed --pretrained, which was not read)."""
    stage = ["--method", "scan", "--width", 4, "--device", "cpu", "--pretrained", tiny_run, "--output_dir",
             tmp_path / "stage2", "--batch_size", 32]
    assert_ok(run_script("main_cluster.py", *stage, "--dataset", "digits", "--epochs", 1))
    fabricate.make_cifar10(tmp_path / "c10")
    before = snapshot(tmp_path / "stage2")
    refused = run_in_process("main_cluster.py", *stage, "--dataset", "cifar10", "--data_path", tmp_path / "c10",
                             "--epochs", 2)
    assert_user_error(refused, "main_cluster.py", "checkpoint.pth was trained with --dataset 'digits'",
                      "this command has 'cifar10'")
    assert snapshot(tmp_path / "stage2") == before


@pytest.mark.parametrize("script", ["main_pretrain.py", "main_cluster.py", "eval_knn.py", "eval_linear.py",
                                    "eval_cluster.py", "launch.py", "collect_results.py"])
def test_a_full_disks_advice_names_flags_of_the_program_itself(script):
    """A full disk or a read-only folder is one line whose advice names where the program writes: collect_results'
    --out, launch.py's --output_root (all of them said --output_dir)."""
    import errno
    import re

    from clusterlab.errors import describe_os_error
    from clusterlab.programs import PROGRAMS

    program = PROGRAMS[script]
    own = {option for action in program.parser()._actions for option in action.option_strings}
    message = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "x"), program.output_flag)
    named = re.findall(r"--\w+", message)
    assert named and set(named) <= own, (named, message)


@pytest.mark.parametrize("program", ["eval_knn", "eval_cluster"])
@pytest.mark.parametrize("method", ["sela", "scan", "scan_selflabel", "swav", "npid"])
def test_the_embedding_of_a_method_without_one_is_refused(program, method):
    """SeLa and SCAN have no embedding besides their backbone: `--features embedding` scored the backbone and recorded
    it as an embedding (a second table row of the same numbers). launch.py asks the same before it submits."""
    from clusterlab.methods import METHODS
    from clusterlab.methods.base import Method
    from clusterlab.errors import ConfigError
    from clusterlab.programs import eval_cluster, eval_knn

    module = {"eval_knn": eval_knn, "eval_cluster": eval_cluster}[program]
    args = module.get_args_parser().parse_args(["--features", "embedding", "--assignment", "kmeans"]
                                               if program == "eval_cluster" else ["--features", "embedding"])
    has_one = METHODS[method].embedding is not Method.embedding
    assert has_one == (method in ("swav", "npid"))
    if has_one:
        module.check_flags(args, METHODS[method])
    else:
        with pytest.raises(ConfigError, match=rf"^--features embedding: method '{method}' has no embedding of its "
                                              rf"own, only its backbone features \(use --features backbone\)$"):
            module.check_flags(args, METHODS[method])
