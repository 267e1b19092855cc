"""launch.py without a cluster: the plan, shell safety of generated scripts, sbatch/ up to date (bad grids and recipes
are in test_bad_inputs.py).

Where launch.py or a script calls Slurm, stand-ins on PATH play its part (`fake_slurm`): sbatch numbers the jobs it
accepts (or refuses them as sbatch does), squeue lists the ids a test puts in the queue, srun records the command
lines it is given."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clusterlab import rundir
from clusterlab.errors import ConfigError
from clusterlab.slurm.grid import RESOURCE_DEFAULTS, load_grid, run_name
from clusterlab.slurm.jobs import make_executor
from clusterlab.slurm.sbatch import recipe_scripts

ROOT = Path(__file__).resolve().parents[1]
# launch.py's last line, on stderr, where it waited for a one-run grid that did not finish or whose evaluation failed
ONE_RUN_INCOMPLETE = ("launch.py: 1 of 1 runs did not finish, or an evaluation job of theirs failed (swav_digits_s0): "
                      "see the lines above\n")
BASE = {"name": "g", "program": "main_pretrain.py", "config": "configs/swav_digits.yaml",
        "axes": {"epochs": [1, 2], "seed": [0]}, "flags": {"method": "swav", "dataset": "digits", "width": 4}}


def run_launch(*args, **environment):
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", **environment},
                          timeout=120)


def grid_file(tmp_path, **changes) -> Path:
    spec = {**BASE, **changes}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_dry_run_prints_plan_and_submits_nothing(tmp_path):
    out = run_launch("--grid", str(grid_file(tmp_path)), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == ("grid g: 2 runs of main_pretrain.py (1 node(s) x 1 task(s), 0 GPU(s)/node, 2 CPU(s)/task, "
                        "8 GB/node, 60 min)")
    assert lines[1].startswith(f"runs go to {tmp_path / 'runs'}/ ")
    assert lines[2].split() == ["run", "state", "epochs", "seed", "evaluation", "jobs", "directory"]
    assert [line.split()[:2] + line.split()[-1:] for line in lines[4:]] == [
        ["swav_digits_1ep_s0", "new", str(tmp_path / "runs" / "swav_digits_1ep_s0")],
        ["swav_digits_2ep_s0", "new", str(tmp_path / "runs" / "swav_digits_2ep_s0")]]
    assert "submitted" not in out.stdout
    assert not (tmp_path / "runs").exists()


def test_the_plan_names_every_resource_a_job_asks_for(tmp_path):
    """A --dry-run said nodes, tasks, GPUs and minutes only: a partition that does not exist, or the memory asked
    for, showed only when sbatch refused (or Slurm kept) the jobs; the evaluation jobs' own resources not at all."""
    grid = grid_file(tmp_path, resources={"partition": "gpu", "qos": "high", "mem_gb": 32, "cpus_per_task": 10,
                                          "gpus_per_node": 4, "nodes": 2},
                     eval_resources={"timeout_min": 30, "gpus_per_node": 1})
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == (
        "grid g: 2 runs of main_pretrain.py (2 node(s) x 4 task(s), 4 GPU(s)/node, 10 CPU(s)/task, 32 GB/node, "
        "60 min, partition gpu, qos high); evaluation jobs: 1 node(s) x 1 task(s), 1 GPU(s)/node, 10 CPU(s)/task, "
        "32 GB/node, 30 min, partition gpu, qos high")


def test_a_finished_run_trained_with_other_flags_is_named_and_not_trained_again(tmp_path):
    run = tmp_path / "runs" / "swav_digits_1ep_s0"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "epochs": 1}))
    (run / "config.yaml").write_text(yaml.safe_dump({"args": {"method": "swav", "dataset": "digits", "width": 8,
                                                              "epochs": 1, "seed": 0}}))
    out = run_launch("--grid", str(grid_file(tmp_path)), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == ("swav_digits_1ep_s0 finished with other flags than the grid gives now "
                                           "(width 8 -> 4): it is not trained again; another output_root trains the "
                                           "grid's")
    assert "swav_digits_2ep_s0 finished" not in out.stdout


def test_flags_that_change_only_how_a_run_trains_or_logs_are_not_other_flags(tmp_path):
    """--log_every or --device changed in a finished grid: the plan said the run finished with other flags and that
    another output_root trains the grid's, as for a change of recipe."""
    run = tmp_path / "runs" / "swav_digits_1ep_s0"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "epochs": 1}))
    (run / "config.yaml").write_text(yaml.safe_dump({"args": {"method": "swav", "dataset": "digits", "width": 4,
                                                              "epochs": 1, "seed": 0, "log_every": 5,
                                                              "device": "auto", "workers": 0}}))
    grid = grid_file(tmp_path, flags={**BASE["flags"], "log_every": 50, "device": "cpu", "workers": 2})
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "other flags" not in out.stdout
    grid = grid_file(tmp_path, flags={**BASE["flags"], "log_every": 50, "width": 8})
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert "(width 4 -> 8): it is not trained again" in out.stdout  # what it learns, alone


def test_a_finished_run_is_compared_with_the_values_of_the_grids_config_file_too(tmp_path):
    """A change made in the grid's config file, not in the grid, went unseen: the finished run was skipped without a
    word, and for new epochs its final evaluation, planned at the file's epochs, was submitted at every launch (and
    skipped by the job, "already recorded")."""
    config = tmp_path / "swav.yaml"
    text = (ROOT / "configs" / "swav_digits.yaml").read_text()
    assert "\nepochs: 60\n" in text and "\nlr: 4.8\n" in text
    config.write_text(text)
    grid = grid_file(tmp_path, config=str(config), axes={"seed": [0]})
    run = tmp_path / "runs" / "swav_digits_s0"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "epochs": 60}))
    (run / "config.yaml").write_text(yaml.safe_dump({"args": {"method": "swav", "dataset": "digits", "width": 4,
                                                              "epochs": 60, "seed": 0, "lr": 4.8}}))
    plan = ["--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run"]

    def state_and_last_line() -> tuple[str, str]:
        out = run_launch(*plan)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        return next(line.split()[1] for line in lines if line.startswith("swav_digits_s0 ")), lines[-1]

    state, last = state_and_last_line()
    assert state == "finished" and "other flags" not in last, last
    config.write_text(text.replace("\nlr: 4.8\n", "\nlr: 0.5\n"))
    assert state_and_last_line() == ("finished", "swav_digits_s0 finished with other flags than the grid gives now "
                                                 "(lr 4.8 -> 0.5): it is not trained again; another output_root "
                                                 "trains the grid's")
    config.write_text(text.replace("\nepochs: 60\n", "\nepochs: 80\n"))
    assert state_and_last_line()[0] == "resume"


SMALL_DATA_GRID = {"name": "small", "axes": {"config": ["configs/swav_small.yaml", "configs/unmix_small.yaml"]},
                   "flags": {"data_path": "data/fm_4000"}}


@pytest.mark.parametrize("grid", [*sorted(path.name for path in (ROOT / "configs" / "grids").glob("*.yaml")),
                                  "small-data configs"])
def test_every_run_of_a_grid_finished_as_it_gives_is_finished_with_no_other_flags(tmp_path, grid):
    """Each run's config.yaml as its program records it (every flag, parsed from the run's command line) and a
    finished status: the plan says finished, and names no flag. The small-data configs give the prototype freezing
    in epochs over their base's iterations, which the program then resets: a plan that merged the layers as plain
    mappings named `freeze_prototypes_niters 313 -> 200` for every finished run."""
    from clusterlab import config
    from clusterlab.programs import PROGRAMS, launch
    from clusterlab.programs.train import parse_args

    if grid == "small-data configs":
        path = tmp_path / "small.yaml"
        path.write_text(yaml.safe_dump(SMALL_DATA_GRID))
    else:
        path = ROOT / "configs" / "grids" / grid
    runs = load_grid(path, tmp_path / "runs").runs
    assert runs
    for run in runs:
        recorded = parse_args(PROGRAMS[run.program].program_kind, run.argv())
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "config.yaml").write_text(yaml.safe_dump({"args": config._plain(vars(recorded))}))
        (run.run_dir / "status.json").write_text(json.dumps({"state": "finished", "epochs": recorded.epochs}))
        assert (launch.run_state(run, set()), launch.differing_flags(run)) == ("finished", []), run.name


def test_a_null_length_in_a_grid_replaces_nothing_of_its_config(tmp_path):
    """A grid's null is left off the job's command line, so the config's length in the other unit stays: read as
    replacing it, two configs that differ only there were refused as runs that "train with the same flags"."""
    other = tmp_path / "fm313.yaml"
    other.write_text(yaml.safe_dump({"base": str(ROOT / "configs" / "swav_fashion_mnist.yaml"),
                                     "freeze_prototypes_niters": 313}))
    spec = {"name": "g", "axes": {"config": ["configs/swav_fashion_mnist.yaml", str(other)],
                                  "freeze_prototypes_epochs": [None]}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = load_grid(path, tmp_path / "runs").runs
    assert [run.settings["freeze_prototypes_niters"] for run in runs] == [200, 313]


def test_epochs_a_run_cannot_be_evaluated_at_are_named_and_not_submitted(tmp_path):
    """evals.epochs past a run's end were dropped without a word; an epoch checkpoint a finished run was trained
    without (a grid that asks for it afterwards) got an evaluation job that failed, submitted again at every launch."""
    run = tmp_path / "runs" / "swav_digits_2ep_s0"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "epochs": 2}))
    (run / "config.yaml").write_text(yaml.safe_dump({"args": {"method": "swav", "dataset": "digits", "width": 4,
                                                              "epochs": 2, "seed": 0}}))
    (run / "checkpoint.pth").write_bytes(b"")
    grid = grid_file(tmp_path, evals={"programs": ["eval_knn.py"], "epochs": [1, 2, 3, "final"]})
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    # Epoch 2 is past the 1-epoch run's end but evaluated on the 2-epoch run (the table shows which): only the epoch
    # that no run reaches is named, once (a grid over epochs named every shorter run's later epochs).
    assert ("evals.epochs 3: past the end of every run evaluated (the longest trains 2 epochs): not evaluated"
            in out.stdout)
    assert "not evaluated there" not in out.stdout and out.stdout.count("evals.epochs") == 1
    assert ("swav_digits_2ep_s0 finished without checkpoint_ep0001.pth (its --checkpoint_epochs did not ask for "
            "them): not evaluated") in out.stdout
    row = next(line for line in out.stdout.splitlines() if line.startswith("swav_digits_2ep_s0 "))
    assert " final (1 program(s) each) " in row and "ep0001" not in row


def test_an_epoch_past_every_evaluated_run_names_the_longest_of_those(tmp_path):
    """In a staged grid only the last stage is evaluated: Super-AND's 1000 epochs of stage 1 were named as the
    longest run for an evaluation epoch past EmbedUL's 300."""
    grid = tmp_path / "grid.yaml"
    grid.write_text((ROOT / "configs" / "grids" / "embedul_cifar.yaml").read_text().replace(
        "epochs: [final]", "epochs: [400, final]"))
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "evals.epochs 400: past the end of every run evaluated (the longest trains 300 epochs)" in out.stdout


def test_a_relaunch_says_why_a_runs_last_start_failed(tmp_path):
    """One run failed while training (status.json has the reason), the other before it wrote anything (a flag the
    method refused while it was built: only the job's log says so). Both were listed as "resume" without a word."""
    runs = tmp_path / "runs"
    diverged, refused = runs / "swav_digits_1ep_s0", runs / "swav_digits_2ep_s0"
    diverged.mkdir(parents=True)
    (diverged / "status.json").write_text(json.dumps({"state": "failed", "epoch": 0, "step": 3,
                                                      "reason": "non-finite loss"}))
    logs = runs / ".submitit" / "139_1"
    logs.mkdir(parents=True)
    (logs / "139_1_0_log.err").write_text(
        "Traceback (most recent call last):\n    raise ConfigError(f\"--queue_length {global_length} must be\")\n"
        "clusterlab.errors.ConfigError: --queue_length 7 must be a positive multiple of the global batch 32\n"
        "srun: error: node1: task 0: Exited with exit code 1\n")
    (refused / "slurm").mkdir(parents=True)
    (refused / "slurm" / "jobs.jsonl").write_text(json.dumps({"job_id": "139_1", "kind": "train", "logs": str(logs)})
                                                 + "\n")
    out = run_launch("--grid", str(grid_file(tmp_path)), "--output_root", str(runs), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2:] == [
        "swav_digits_1ep_s0: its last start failed (non-finite loss); it is submitted again",
        "swav_digits_2ep_s0: its last start failed (ConfigError: --queue_length 7 must be a positive multiple of the "
        "global batch 32); it is submitted again"]


def test_a_run_finished_beyond_the_grids_epochs_is_named_and_not_submitted(tmp_path):
    """A grid lowered to 1 epoch after its run finished 2: the run was planned "resume", its job refused to go back
    (--epochs 1 below the checkpoint's 2) at every launch, and its final checkpoint was evaluated as epoch 1."""
    run = tmp_path / "runs" / "swav_digits_1ep_s0"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "epoch": 2, "epochs": 2}))
    (run / "checkpoint.pth").write_bytes(b"")
    grid = grid_file(tmp_path, axes={"epochs": [1], "seed": [0]}, evals={"programs": ["eval_knn.py"]})
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("swav_digits_1ep_s0 "))
    assert row.split()[:2] == ["swav_digits_1ep_s0", "finished"] and " - " in row
    assert out.stdout.splitlines()[-1] == (
        "swav_digits_1ep_s0 finished 2 epochs, more than the 1 the grid gives now: it is not trained again, nor its "
        "final checkpoint evaluated as epoch 1; another output_root trains the grid's")


@pytest.mark.parametrize("status, saved_at, position", [
    ({"state": "interrupted", "epoch": 1, "step": 0, "epochs": 2}, (1, 0), "the end of epoch 1"),
    ({"state": "failed", "epoch": 1, "step": 3, "epochs": 2}, (1, 3), "epoch 2 step 3"),
    # stopped between its last checkpoint and "finished": epochs 2 finish it without training (3 trained on)
    ({"state": "interrupted", "epoch": 2, "step": 0, "epochs": 2}, (2, 0), "the end of epoch 2"),
    ({"state": "failed", "epoch": 1, "step": 3, "epochs": 2}, (0, 5), None)])
def test_an_unfinished_run_the_grid_gives_fewer_epochs_than_its_checkpoint_is_named_and_not_submitted(
        tmp_path, status, saved_at, position):
    """A grid lowered to 1 epoch while its run's checkpoint stood at (or past) the end of epoch 1 of 2: planned
    "resume", its job was refused at every launch, and its evaluations with it. Read from the checkpoint, as the
    training reads it: one copied back to an earlier epoch (status.json still where the failed start stopped)
    resumes."""
    from clusterlab import checkpoint

    run = tmp_path / "runs" / "swav_digits_s0"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps(status))
    epoch, step = saved_at
    checkpoint.save({"epoch": epoch, "step": step, "args": {"epochs": 2}}, run / "checkpoint.pth", kind="pretrain",
                    method="swav")
    grid = grid_file(tmp_path, axes={"seed": [0]}, flags={**BASE["flags"], "epochs": 1},
                     evals={"programs": ["eval_knn.py"]})
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("swav_digits_s0 "))
    assert row.split()[:2] == ["swav_digits_s0", "ahead" if position else "resume"], out.stdout
    if position is None:
        return
    assert (f"swav_digits_s0's checkpoint.pth stands at {position} of the 2 epochs its schedule plans, and the grid "
            f"gives 1: its training would be refused, so it is not submitted, nor evaluated, nor the stages after it; "
            f"give it epochs 2 or more to go on, or another output_root trains the grid's") in out.stdout.splitlines()
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--cluster=debug")
    assert out.returncode == 1 and out.stderr == ONE_RUN_INCOMPLETE, out.stderr  # (waited for: the grid is not done)
    assert "submitted" not in out.stdout.replace("not submitted", ""), out.stdout
    assert out.stdout.splitlines()[-1] == "  swav_digits_s0: not submitted (it stands past the grid's epochs)"
    assert sorted(path.name for path in run.iterdir()) == ["checkpoint.pth", "status.json"]


def test_a_job_recorded_after_a_line_cut_short_is_read_back(tmp_path):
    """jobs.jsonl ending in a line a crash cut short: the next job's record was appended to it, unreadable, and
    --wait did not judge the run by that job (a failed evaluation ended with status 0)."""
    from types import SimpleNamespace

    from clusterlab.programs.launch import record_job, recorded_jobs

    run = SimpleNamespace(run_dir=tmp_path / "run")
    (run.run_dir / "slurm").mkdir(parents=True)
    (run.run_dir / "slurm" / "jobs.jsonl").write_text('{"job_id": "7", "kind": "train"}\n{"job_id": "DEBUG_1", "ki')
    record_job(run, SimpleNamespace(job_id="DEBUG_2", paths=SimpleNamespace(folder=tmp_path / "logs")), "train")
    assert [job["job_id"] for job in recorded_jobs(run.run_dir)] == ["7", "DEBUG_2"]


def test_a_relaunch_says_why_an_evaluation_job_ended_without_succeeding(tmp_path):
    """The plan listed the evaluation to submit again without a word, and --wait said only "finished"."""
    run = tmp_path / "runs" / "swav_digits_1ep_s0"
    (run / "slurm").mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "epoch": 1, "epochs": 1}))
    logs = tmp_path / "runs" / ".submitit" / "172"
    logs.mkdir(parents=True)
    (logs / "172_0_log.err").write_text(
        "Traceback (most recent call last):\n    raise ConfigError(message)\n"
        "clusterlab.errors.ConfigError: --clusters 5000 is more than the 898 images of the train split\n")
    (logs / "174_0_log.err").write_text("slurmstepd: error: *** STEP 174.0 CANCELLED ***\n")
    evals = [{"job_id": "172", "kind": "eval", "logs": str(logs), "checkpoint": "checkpoint.pth",
              "programs": ["eval_knn.py", "eval_cluster.py"]},
             {"job_id": "173", "kind": "eval", "logs": str(tmp_path / "never"), "checkpoint": "checkpoint.pth",
              "programs": ["eval_linear.py"]},
             {"job_id": "174", "kind": "eval", "logs": str(logs), "checkpoint": "checkpoint_ep0009.pth",
              "programs": ["eval_knn.py"]}]  # an epoch the grid no longer asks for
    (run / "slurm" / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in evals))
    grid = grid_file(tmp_path, axes={"epochs": [1], "seed": [0]},
                     evals={"programs": ["eval_knn.py", "eval_cluster.py", "eval_linear.py"]})
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-3:] == [
        "swav_digits_1ep_s0: the evaluation job 172 of checkpoint.pth (eval_cluster.py, eval_knn.py) ended without "
        "succeeding (ConfigError: --clusters 5000 is more than the 898 images of the train split); it is submitted "
        "again",
        "swav_digits_1ep_s0: the evaluation job 173 of checkpoint.pth (eval_linear.py) ended without succeeding (it "
        "left no log: it never started (a training job it waited for failed, or it was cancelled)); it is submitted "
        "again",
        "swav_digits_1ep_s0: the evaluation job 174 of checkpoint_ep0009.pth (eval_knn.py) ended without succeeding "
        "(its log names no exception); it is not submitted again (the plan does not ask for it)"]


@pytest.mark.slow
def test_the_debug_cluster_reports_a_bad_flag_on_one_line_without_a_debugger(tmp_path):
    """submitit's debug executor opened pdb on the job's ConfigError (at a terminal it waited for input)."""
    grid = grid_file(tmp_path, axes={"seed": [0]}, flags={**BASE["flags"], "epochs": 1, "queue_length": 7,
                                                          "device": "cpu"})
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--cluster", "debug")
    assert out.returncode == 1 and out.stderr == ONE_RUN_INCOMPLETE, out.stderr
    assert "(Pdb)" not in out.stdout
    assert any(line.startswith("job DEBUG_") and "failed: --queue_length 7 must be a positive multiple"
               in line for line in out.stdout.splitlines()), out.stdout


@pytest.mark.slow
def test_the_debug_cluster_evaluates_no_stage_whose_previous_stage_failed(tmp_path):
    """Local and debug jobs know no dependencies: the second stage was not started after the first failed, but its
    evaluation job was, and failed on a run directory that was never written."""
    stages = [{"name": "embed", "config": "configs/swav_digits.yaml",
               "flags": {"queue_length": 7, "epochs": 1, "width": 4, "device": "cpu"}},
              {"name": "assign", "config": "configs/scan_fashion_mnist.yaml", "pretrained_from": "embed",
               "flags": {"dataset": "digits", "epochs": 1, "device": "cpu"}},
              {"name": "selflabel", "config": "configs/scan_selflabel_fashion_mnist.yaml", "pretrained_from": "assign",
               "flags": {"dataset": "digits", "epochs": 1, "device": "cpu"}}]
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "p", "stages": stages, "axes": {"seed": [0]},
                                    "evals": {"programs": ["eval_cluster.py"]}}, sort_keys=False))
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--cluster", "debug")
    assert out.returncode == 1, out.stderr
    assert out.stderr == ("launch.py: 3 of 3 runs did not finish, or an evaluation job of theirs failed (embed_s0, "
                          "assign_s0, selflabel_s0): see the lines above\n")
    assert "failed: --queue_length 7 must be a positive multiple" in out.stdout
    assert "assign_s0: not started, nor evaluated (the job of its previous stage failed)" in out.stdout, out.stdout
    # the third stage waits for no job (the second's was never submitted): it was started, on nothing
    assert "selflabel_s0: not started, nor evaluated (an earlier stage's job failed)" in out.stdout, out.stdout
    assert "submitted 1 training job(s)" in out.stdout and "evaluation job(s)" not in out.stdout
    assert not (tmp_path / "runs" / "assign_s0").exists() and not (tmp_path / "runs" / "selflabel_s0").exists()


def test_a_run_that_another_process_trains_is_neither_submitted_nor_evaluated(tmp_path):
    """A run of the grid started outside this launch (by hand, an sbatch script, another grid) holds its directory's
    lock: launch.py planned it as `resume` and submitted a second training job, which failed on the lock with a
    traceback (its evaluations were dropped), and every launch after it submitted one again. The stage after it,
    which would read an unfinished first stage, waits too."""
    stages = [{"name": "embed", "config": "configs/swav_digits.yaml", "flags": {"epochs": 1, "width": 4}},
              {"name": "assign", "config": "configs/scan_fashion_mnist.yaml", "pretrained_from": "embed",
               "flags": {"dataset": "digits", "epochs": 1}}]
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "p", "stages": stages, "axes": {"seed": [0]},
                                    "evals": {"programs": ["eval_knn.py"]}}, sort_keys=False))
    lock = rundir.RunLock(tmp_path / "runs" / "embed_s0")
    lock.acquire()  # held by this test's own process, alive, on this host
    try:
        for how in ("--dry-run", "--cluster=debug"):
            out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), how)
            assert out.returncode == (how == "--cluster=debug"), out.stderr
            rows = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()[4:6]}
            assert rows == {"embed_s0": "held", "assign_s0": "new"}, out.stdout
            assert (f"embed_s0 is in use by pid {os.getpid()} on {socket.gethostname()} since "
                    in out.stdout), out.stdout
            assert "not submitted, nor evaluated, nor the stages after it; launch again once it has" in out.stdout
            assert "submitted" not in out.stdout.replace("not submitted", ""), out.stdout
            if how == "--cluster=debug":  # its report after the jobs: neither blamed on a job that failed
                assert out.stdout.splitlines()[-2:] == [
                    "  embed_s0: not submitted (held by a process or job this launch does not know of)",
                    "  assign_s0: not submitted (it starts from a run that is not submitted)"], out.stdout
    finally:
        lock.release()
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["embed_s0"]
    assert list((tmp_path / "runs" / "embed_s0").iterdir()) == []


def test_a_later_stage_finished_from_weights_the_grid_now_trains_longer_is_named(tmp_path):
    """The first stage lengthened in the grid: it resumed to the new epochs, while the second, finished from the
    first's old weights, was planned `finished` without a word (its tables mixed the two)."""
    stages = [{"name": "embed", "config": "configs/swav_digits.yaml", "flags": {"epochs": 6, "width": 4}},
              {"name": "assign", "config": "configs/scan_fashion_mnist.yaml", "pretrained_from": "embed",
               "flags": {"dataset": "digits", "epochs": 1}}]
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "p", "stages": stages, "axes": {"seed": [0]}}, sort_keys=False))
    embed, assign = tmp_path / "runs" / "embed_s0", tmp_path / "runs" / "assign_s0"
    for run, epochs in ((embed, 5), (assign, 1)):
        run.mkdir(parents=True)
        (run / "status.json").write_text(json.dumps({"state": "finished", "epochs": epochs}))
    (assign / "config.yaml").write_text(yaml.safe_dump({
        "args": {"method": "scan", "dataset": "digits", "epochs": 1, "seed": 0},
        "pretrained_from": {"checkpoint": str(embed / "checkpoint.pth"), "method": "swav", "epoch": 5}}))
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()[4:6]}
    assert rows == {"embed_s0": "resume", "assign_s0": "finished"}, out.stdout
    assert ("assign_s0 finished from embed_s0's weights after epoch 5, and the grid now trains embed_s0 6 epochs: "
            "assign_s0 is not trained again from them (nor evaluated again); another output_root trains the "
            "grid's") in out.stdout.splitlines()
    stages[0]["flags"]["epochs"] = 5
    grid.write_text(yaml.safe_dump({"name": "p", "stages": stages, "axes": {"seed": [0]}}, sort_keys=False))
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert "weights after epoch" not in out.stdout
    # the first stage finished 6 epochs, the grid now gives 5: it is not trained again, so its weights stay those
    # the second stage started from
    (embed / "status.json").write_text(json.dumps({"state": "finished", "epochs": 6}))
    (assign / "config.yaml").write_text((assign / "config.yaml").read_text().replace("epoch: 5", "epoch: 6"))
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--dry-run")
    assert "embed_s0 finished 6 epochs, more than the 5" in out.stdout and "weights after epoch" not in out.stdout


REFUSED = ('Traceback (most recent call last):\n  File "main_pretrain.py", line 1, in <module>\n'
           "clusterlab.errors.CheckpointError: checkpoint.pth was trained with --batch_size 256, this command has "
           "512\n")
# what a loader worker's teardown may print after the failure
NOISE = ("Exception ignored in: <function _MultiProcessingDataLoaderIter.__del__ at 0x7f>\n"
         'Traceback (most recent call last):\n  File "dataloader.py", line 2, in __del__\n'
         "ConnectionResetError: [Errno 104] Connection reset by peer\n")


@pytest.mark.parametrize("log, status, said", [
    # a resume refused after a pre-emption: status.json is the pre-empted start's, older than the job
    (REFUSED, {"state": "interrupted", "updated": "2029-12-31T23:00:00Z"}, "CheckpointError: checkpoint.pth was "
     "trained with --batch_size 256, this command has 512"),
    (REFUSED + NOISE, None, "CheckpointError: checkpoint.pth was trained with --batch_size 256, this command has 512"),
    ('OSError: image file is truncated\nTraceback (most recent call last):\n  File "a.py", line 3\n    assert x\n'
     "AssertionError\n", None, "AssertionError"),
    ("ErrorRate: 0.3\n", None, None),  # no traceback: nothing to name
    # the job's own start wrote status.json (after its submission): its reason, and nothing for a pre-emption
    (REFUSED, {"state": "failed", "reason": "non-finite loss", "updated": "2030-01-01T00:00:05Z"}, "non-finite loss"),
    (REFUSED, {"state": "interrupted", "updated": "2030-01-01T00:00:05Z"}, None),
], ids=["stale-status", "teardown-noise", "bare-exception", "no-traceback", "status-of-the-job", "preempted"])
def test_the_failure_named_is_the_last_jobs(tmp_path, log, status, said):
    from clusterlab.programs.launch import last_failure

    run, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    (logs / "7_0_log.err").write_text(log)
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "jobs.jsonl").write_text(json.dumps({"job_id": "7", "kind": "train", "logs": str(logs),
                                                          "submitted": "2030-01-01T00:00:00Z"}) + "\n")
    if status:
        (run / "status.json").write_text(json.dumps(status))
    assert last_failure(run) == said


def test_relative_output_root_is_made_absolute(tmp_path):
    """A relative root means the directory where launch.py runs, also for a generated script run elsewhere."""
    grid = load_grid(grid_file(tmp_path), "some/where")
    assert grid.runs[0].run_dir == Path.cwd() / "some" / "where" / "swav_digits_1ep_s0"


def test_run_names_are_stable_readable_and_safe():
    assert run_name({"method": "swav", "dataset": "digits", "epochs": 100, "seed": 0},
                    ["method", "epochs", "seed"]) == "swav_digits_100ep_s0"
    assert run_name({"method": "swav", "dataset": "d", "lr": 0.6}, ["lr"]) == "swav_d_lr0.6"
    hostile = run_name({"method": "swav", "dataset": "d", "arch": "a b'; $(rm -rf ~)"}, ["arch"])
    assert hostile == "swav_d_archa-b-rm--rf"
    assert run_name({"method": "..", "dataset": "/"}, ["method"]) == "run"
    assert run_name({"method": "swav", "dataset": "d", "lr": "1e+3"}, ["lr"]) == "swav_d_lr1e-3"


HOSTILE = "a b'\"; $(touch PWNED) `touch PWNED2` ${HOME}\ntouch PWNED3"


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def fake_slurm(tmp_path: Path) -> dict:
    """An environment whose srun, sbatch, squeue and scontrol are stand-ins kept in tmp_path/slurm:
    srun writes each command line to srun.jsonl and succeeds; sbatch accepts jobs numbered from 101 (sbatch.log
    keeps their scripts' names) or, when the file `refuse` exists, prints its text as sbatch's error and fails;
    squeue lists the ids in `queue`; `scontrol show job` names stdout.log as the job's log."""
    state = tmp_path / "slurm"
    state.mkdir()
    python = sys.executable
    _executable(state / "srun", f'#!/bin/bash\nexec {python} -c "import json, sys; print(json.dumps(sys.argv[1:]))" '
                                '"$@" >> "$FAKE_SLURM/srun.jsonl"\n')
    _executable(state / "sbatch", '#!/bin/bash\n'
                                  'if [ -f "$FAKE_SLURM/refuse" ]; then\n'
                                  '  sed "s/^/sbatch: error: /" "$FAKE_SLURM/refuse" >&2; exit 1\n'
                                  'fi\n'
                                  'n=$(( $(cat "$FAKE_SLURM/next" 2>/dev/null || echo 100) + 1 ))\n'
                                  'echo "$n" > "$FAKE_SLURM/next"; echo "$n $*" >> "$FAKE_SLURM/sbatch.log"\n'
                                  'echo "Submitted batch job $n"\n')
    _executable(state / "squeue", '#!/bin/bash\ncat "$FAKE_SLURM/queue" 2>/dev/null; exit 0\n')
    _executable(state / "scontrol",
                '#!/bin/bash\n[ "$1 $2" = "show job" ] && echo "   StdOut=$FAKE_SLURM/stdout.log"\n')
    return {**os.environ, "PATH": f"{state}:{os.environ['PATH']}", "FAKE_SLURM": str(state), "SLURM_JOB_ID": "7",
            "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}


def srun_calls(env: dict) -> list[list[str]]:
    """The command lines srun was given, less srun's own --unbuffered."""
    path = Path(env["FAKE_SLURM"]) / "srun.jsonl"
    calls = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [call[1:] if call[:1] == ["--unbuffered"] else call for call in calls]


def run_sbatch_script(script: Path, env: dict, *args, cwd: Path) -> subprocess.CompletedProcess:
    """The script run by bash as Slurm would start it, with srun recording instead of running."""
    done = subprocess.run(["bash", str(script), *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done


def test_hostile_grid_values_cannot_inject_shell(tmp_path):
    """A value full of quotes, substitutions and a newline reaches the program as one literal argument."""
    grid = grid_file(tmp_path, flags={**BASE["flags"], "train_split": HOSTILE},
                     evals={"programs": ["eval_knn.py"], "flags": {"eval_knn.py": {"data_path": HOSTILE}}})
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--emit-sbatch",
                     "--sbatch_dir", str(tmp_path / "scripts"))
    assert out.returncode == 0, out.stderr
    scripts = sorted((tmp_path / "scripts").glob("*.sh"))
    assert len(scripts) == 2
    env = {**fake_slurm(tmp_path), "EXPERIMENT_PATH": str(tmp_path / "exp")}
    work = tmp_path / "work"
    work.mkdir()
    run_sbatch_script(scripts[0], env, cwd=work)
    train, knn = srun_calls(env)
    assert train[train.index("--train_split") + 1] == HOSTILE
    assert knn[knn.index("--data_path") + 1] == HOSTILE
    assert not any(p.name.startswith("PWNED") for p in [*work.iterdir(), *tmp_path.iterdir()])


def test_hostile_recipe_values_are_inert_and_comments_stay_comments(tmp_path):
    """A recipe's flags, evaluation flags and description, and the script's own arguments, run nothing."""
    recipes = tmp_path / "recipes.yaml"
    recipes.write_text(yaml.safe_dump({"hostile": {
        "description": f"two lines\ntouch PWNED_DESCRIPTION {HOSTILE}", "config": "configs/swav_digits.yaml",
        "flags": {"train_split": HOSTILE}, "evals": ["eval_knn.py"],
        "eval_flags": {"eval_knn.py": {"data_path": HOSTILE}}}}))
    out = run_launch("--emit-sbatch", "--recipes", str(recipes), "--sbatch_dir", str(tmp_path / "scripts"))
    assert out.returncode == 0, out.stderr
    script = tmp_path / "scripts" / "hostile.sh"
    lines = script.read_text().splitlines()
    assert lines[1].startswith("# hostile: two lines touch PWNED_DESCRIPTION") and lines[2].startswith("# Generated")
    env = fake_slurm(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    run_sbatch_script(script, env, "--seed", HOSTILE, cwd=work)
    train, knn = srun_calls(env)
    assert train[train.index("--train_split") + 1] == HOSTILE and train[-2:] == ["--seed", HOSTILE]
    assert knn[knn.index("--data_path") + 1] == HOSTILE
    assert train[train.index("--output_dir") + 1] == "experiments/hostile"
    assert not [p for p in tmp_path.rglob("PWNED*")]


@pytest.mark.parametrize("moved", [["--output_dir", "moved run"], ["--output_dir=moved run"]], ids=["space", "equals"])
def test_output_dir_argument_moves_training_and_its_evaluations(tmp_path, moved):
    """sbatch sbatch/swav_digits.sh --output_dir DIR: training writes DIR and the evaluations read DIR."""
    env = {**fake_slurm(tmp_path), "EXPERIMENT_PATH": str(tmp_path / "unused")}
    run_sbatch_script(ROOT / "sbatch" / "swav_digits.sh", env, "--epochs", "1", *moved, cwd=tmp_path)
    train, knn, cluster = srun_calls(env)
    assert train[train.index("--output_dir") + 1] == "moved run" and train[-2:] == ["--epochs", "1"]
    assert train.count("--output_dir") == 1 and not any("output_dir=" in a for a in train)
    assert knn[:4] == ["python", "eval_knn.py", "--run", "moved run"]
    assert cluster[1:4] == ["eval_cluster.py", "--run", "moved run"]
    assert not (tmp_path / "unused").exists()
    # The job's log is linked from the run directory it moved to.
    assert os.readlink(tmp_path / "moved run" / "slurm" / "7.out") == str(tmp_path / "slurm" / "stdout.log")


def test_output_dir_argument_moves_every_stage_of_a_pipeline(tmp_path):
    env = fake_slurm(tmp_path)
    run_sbatch_script(ROOT / "sbatch" / "embedul_c10.sh", env, "--output_dir", "pipe", "--epochs", "1", cwd=tmp_path)
    superand, embedul, heads = srun_calls(env)
    assert superand[superand.index("--output_dir") + 1] == "pipe/superand"
    assert embedul[embedul.index("--output_dir") + 1] == "pipe/embedul"
    assert embedul[embedul.index("--pretrained") + 1] == "pipe/superand"
    assert heads[1:4] == ["eval_cluster.py", "--run", "pipe/embedul"]


def test_output_dir_argument_without_a_value_stops_the_script(tmp_path):
    env = fake_slurm(tmp_path)
    done = subprocess.run(["bash", str(ROOT / "sbatch" / "swav_digits.sh"), "--output_dir"], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "--output_dir needs a directory" in done.stderr
    assert srun_calls(env) == []


def default_experiment_path(script: Path) -> str:
    """The directory a script writes when EXPERIMENT_PATH is not set: its `EXPERIMENT_PATH=${EXPERIMENT_PATH:-...}`."""
    line = next(line for line in script.read_text().splitlines() if line.startswith("EXPERIMENT_PATH=${"))
    return shlex.split(line.removeprefix("EXPERIMENT_PATH=${EXPERIMENT_PATH:-").removesuffix("}"))[0]


def test_grid_scripts_write_the_run_directories_a_later_stage_reads(tmp_path):
    """launch.py --grid (staged) --emit-sbatch: stage 1's script writes, by default, the run directory --dry-run and
    submitit use, which is stage 2's --pretrained; --output_root moves both; EXPERIMENT_PATH still overrides."""
    grid = str(ROOT / "configs" / "grids" / "embedul_cifar.yaml")
    out = run_launch("--grid", grid, "--emit-sbatch", "--sbatch_dir", str(tmp_path / "default"))
    assert out.returncode == 0, out.stderr
    runs = ROOT / "runs" / "embedul_cifar"  # the grid's default output_root, from where launch.py ran
    assert default_experiment_path(tmp_path / "default" / "superand_s0.sh") == str(runs / "superand_s0")
    assert default_experiment_path(tmp_path / "default" / "embedul_s0.sh") == str(runs / "embedul_s0")
    assert f"--pretrained {runs / 'superand_s0'} " in (tmp_path / "default" / "embedul_s0.sh").read_text()

    root = tmp_path / "my runs"
    out = run_launch("--grid", grid, "--output_root", str(root), "--emit-sbatch", "--sbatch_dir",
                     str(tmp_path / "moved"))
    assert out.returncode == 0, out.stderr
    assert default_experiment_path(tmp_path / "moved" / "superand_s1.sh") == str(root / "superand_s1")
    assert f"{root / 'superand_s1'}" in (tmp_path / "moved" / "superand_s1.sh").read_text().splitlines()[6]
    env = fake_slurm(tmp_path)
    env.pop("EXPERIMENT_PATH", None)
    work = tmp_path / "work"
    work.mkdir()
    for stage in ("superand", "embedul"):
        run_sbatch_script(tmp_path / "moved" / f"{stage}_s1.sh", env, "--epochs", "1", cwd=work)
    superand, embedul, heads = srun_calls(env)
    assert superand[superand.index("--output_dir") + 1] == str(root / "superand_s1")
    assert embedul[embedul.index("--pretrained") + 1] == str(root / "superand_s1")
    assert embedul[embedul.index("--output_dir") + 1] == str(root / "embedul_s1")
    assert heads[1:4] == ["eval_cluster.py", "--run", str(root / "embedul_s1")]
    assert (root / "superand_s1" / "slurm").is_dir() and not list(work.iterdir())
    # EXPERIMENT_PATH from the environment still wins.
    run_sbatch_script(tmp_path / "moved" / "superand_s1.sh", {**env, "EXPERIMENT_PATH": "elsewhere"}, cwd=work)
    moved = srun_calls(env)[-1]
    assert moved[moved.index("--output_dir") + 1] == "elsewhere"


def test_grid_scripts_read_the_grids_data_path_and_name_their_own_folder(tmp_path):
    """A grid's data_path is its scripts' default DATASET_PATH (the environment still overrides it), and their usage
    line names the folder they were written into."""
    grid = yaml.safe_load((ROOT / "configs" / "grids" / "digits_smoke.yaml").read_text())
    grid["config"] = str(ROOT / grid["config"])
    grid["flags"].update(dataset="cifar10", data_path="/scratch/my data")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    out = run_launch("--grid", str(path), "--emit-sbatch", "--sbatch_dir", str(tmp_path / "scripts"))
    assert out.returncode == 0, out.stderr
    text = (tmp_path / "scripts" / "swav_cifar10_2ep_s0.sh").read_text()
    assert "DATASET_PATH=${DATASET_PATH:-'/scratch/my data'}" in text.splitlines()
    assert f"# Usage (from the repository root): sbatch {tmp_path / 'scripts'}/swav_cifar10_2ep_s0.sh" in text
    assert "# Environment: DATASET_PATH (the grid's data_path)," in text
    assert '    --data_path "$DATASET_PATH" --output_dir "$EXPERIMENT_PATH" ${args[@]+"${args[@]}"}' in text


def test_digits_scripts_pass_no_data_path(tmp_path):
    """Digits ship inside scikit-learn: every digits script passed its DATASET_PATH (default `data`), which the
    training never read."""
    shipped = (ROOT / "sbatch" / "swav_digits.sh").read_text()
    out = run_launch("--grid", str(ROOT / "configs" / "grids" / "digits_smoke.yaml"), "--emit-sbatch",
                     "--sbatch_dir", str(tmp_path / "scripts"))
    assert out.returncode == 0, out.stderr
    for text in (shipped, (tmp_path / "scripts" / "swav_digits_2ep_s0.sh").read_text()):
        assert "--data_path" not in text and "# Environment: DATASET_PATH (not read: digits ship inside" in text


def test_every_shipped_script_parses_and_logs_outside_the_repository_root():
    """bash -n on each script; the job log goes to experiments/logs/, which ships (Slurm does not create it) and
    whose contents git ignores."""
    for script in sorted((ROOT / "sbatch").glob("*.sh")):
        parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert parsed.returncode == 0, (script.name, parsed.stderr)
        assert "#SBATCH --output=experiments/logs/%x_%j.out\n" in script.read_text(), script.name
    assert (ROOT / "experiments" / "logs" / ".gitignore").is_file()
    logs = ["experiments/logs/swav_digits_12.out", "slurm-12.out", "swav_digits_12.out"]
    ignored = subprocess.run(["git", "check-ignore", *logs], cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == logs, ignored.stderr
    tracked = subprocess.run(["git", "check-ignore", "experiments/logs/.gitignore"], cwd=ROOT, capture_output=True)
    assert tracked.returncode == 1  # not ignored: the folder ships


def test_relaunch_does_not_submit_evaluations_that_are_still_queued(tmp_path):
    """A finished run whose evaluation job is still pending: launching the grid again submits nothing; a program
    added to the grid gets a job of its own; once the job has left the queue unrecorded, it is submitted again."""
    env = fake_slurm(tmp_path)
    runs = tmp_path / "runs"
    run = runs / "swav_digits_1ep_s0"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "finished", "epochs": 1}))
    evals = {"programs": ["eval_knn.py", "eval_cluster.py"]}

    def launch(**changes):
        grid = grid_file(tmp_path, axes={"epochs": [1], "seed": [0]}, evals=evals, **changes)
        done = subprocess.run([sys.executable, "launch.py", "--grid", str(grid), "--output_root", str(runs)],
                              cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def eval_jobs():
        lines = (run / "slurm" / "jobs.jsonl").read_text().splitlines()
        return [(job["job_id"], job["checkpoint"], job["programs"]) for job in map(json.loads, lines)]

    assert "submitted 1 evaluation job(s)" in launch()
    assert eval_jobs() == [("101", "checkpoint.pth", ["eval_knn.py", "eval_cluster.py"])]
    (tmp_path / "slurm" / "queue").write_text("99\n101\n")
    again = launch()
    assert "submitted" not in again and "queued: final" in again
    evals["programs"].append("eval_linear.py")
    assert "submitted 1 evaluation job(s)" in launch()
    assert eval_jobs()[-1] == ("102", "checkpoint.pth", ["eval_linear.py"])
    (tmp_path / "slurm" / "queue").write_text("")
    assert "submitted 1 evaluation job(s)" in launch()
    assert eval_jobs()[-1] == ("103", "checkpoint.pth", ["eval_knn.py", "eval_cluster.py", "eval_linear.py"])


@pytest.mark.parametrize("refusal, named", [
    ("invalid partition specified: nosuch\nBatch job submission failed: Invalid partition name specified",
     "invalid partition specified: nosuch; Batch job submission failed: Invalid partition name specified"),
    ("Invalid account or account/partition combination specified", "Invalid account"),
])
def test_sbatch_refusal_is_one_line(tmp_path, refusal, named):
    env = fake_slurm(tmp_path)
    (tmp_path / "slurm" / "refuse").write_text(refusal + "\n")
    done = subprocess.run([sys.executable, "launch.py", "--grid", str(grid_file(tmp_path)), "--output_root",
                           str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("launch.py: error: sbatch refused the training job(s) of swav_digits_1ep_s0, "
                               "swav_digits_2ep_s0: ") and named in lines[0]


def test_tasks_get_the_cpus_of_the_job(tmp_path, monkeypatch):
    """Since Slurm 22.05 srun does not take --cpus-per-task from the job: submitit's srun and the generated scripts'
    srun are told (the scripts through SRUN_CPUS_PER_TASK)."""
    monkeypatch.setenv("PATH", fake_slurm(tmp_path)["PATH"])  # submitit builds a Slurm executor where srun is
    executor = make_executor(tmp_path, {**RESOURCE_DEFAULTS, "tasks_per_node": 1, "cpus_per_task": 6}, "slurm", "x")
    assert executor._executor.parameters["srun_args"] == ["--cpus-per-task", "6"]
    script = (ROOT / "sbatch" / "unmix_c10_400ep.sh").read_text()
    assert "\nexport SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-1}}\n" in script
    assert script.index("SRUN_CPUS_PER_TASK") < script.index("srun --unbuffered")


@pytest.mark.parametrize("requeue, restarts", [("works", 0), ("refused", 0), ("refused", 1)])
def test_a_stopped_step_whose_requeue_fails_ends_the_job_as_failed_unless_slurm_requeued_it(tmp_path, requeue,
                                                                                         restarts):
    """The training step exits 75 (stopped, saved): the script asks Slurm to requeue the job. Were the requeue
    refused, ending with 0 would mark the job COMPLETED and start its afterok dependents on a half-trained run.
    Refused because a `scontrol requeue` from outside has requeued the job already (its Restarts count is ahead of
    this start's), the job is requeued: the script said to submit it again, which would run it twice."""
    env = {**fake_slurm(tmp_path), "EXPERIMENT_PATH": str(tmp_path / "exp")}
    state = Path(env["FAKE_SLURM"])
    _executable(state / "srun", "#!/bin/bash\nexit 75\n")
    refuse = '{ echo "Job is pending execution" >&2; exit 1; }'
    _executable(state / "scontrol", '#!/bin/bash\n[ "$1" = requeue ] && echo "$2" >> "$FAKE_SLURM/requeued" '
                                    f'&& {{ [ {requeue} = works ] || {refuse}; }}'
                                    f'\n[ "$1" = show ] && echo "JobId=7 Restarts={restarts} BatchFlag=1"\nexit 0\n')
    done = subprocess.run(["bash", str(ROOT / "sbatch" / "swav_digits.sh")], cwd=tmp_path, capture_output=True,
                          text=True, env=env)
    # a job whose Restarts is ahead was requeued from outside: it is not asked for again
    assert (state / "requeued").read_text() == "7\n" if not restarts else not (state / "requeued").exists()
    if requeue == "works":
        assert done.returncode == 0, done.stderr
    elif restarts:
        assert done.returncode == 0 and "requeued already" in done.stderr and "failed" not in done.stderr
    else:
        assert done.returncode == 75, done.stderr
        assert "scontrol requeue failed (Job is pending execution): not requeued" in done.stderr


def run_recipe_under_fake_slurm(tmp_path, srun: str, job_state: str = "RUNNING",
                                reason: str = "None") -> tuple[subprocess.CompletedProcess, Path]:
    """sbatch/swav_digits.sh (three steps: training, kNN, k-means) under fake srun and scontrol: `srun` is the
    body of srun's script (`$n`: which step it is), scontrol shows the job in `job_state` for `reason` and logs
    each requeue."""
    env = {**fake_slurm(tmp_path), "EXPERIMENT_PATH": str(tmp_path / "exp")}
    state = Path(env["FAKE_SLURM"])
    _executable(state / "srun", '#!/bin/bash\nn=$(( $(cat "$FAKE_SLURM/steps" 2>/dev/null || echo 0) + 1 ))\n'
                                'echo "$n" > "$FAKE_SLURM/steps"\n' + srun)
    _executable(state / "scontrol", '#!/bin/bash\n[ "$1" = requeue ] && echo "$2" >> "$FAKE_SLURM/requeued"\n'
                                    f'[ "$1" = show ] && echo "JobId=7 JobState={job_state} Reason={reason} Restarts=0"\nexit 0\n')
    done = subprocess.run(["bash", str(ROOT / "sbatch" / "swav_digits.sh")], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=60)
    return done, state


def test_a_term_to_the_batch_shell_reaches_the_step_as_usr2_and_requeues(tmp_path):
    """srun answers a TERM by killing the tasks at once (no checkpoint: the epoch is lost); USR2 it forwards, and
    training saves at its next step. The batch shell's TERM (a pre-emption, `scancel -b`) goes on as USR2."""
    note_and_leave = 'echo "$n {0}" >> "$FAKE_SLURM/got"; kill $!; exit 75'
    done, state = run_recipe_under_fake_slurm(tmp_path, "sleep 20 < /dev/null > /dev/null 2>&1 &\n" + "".join(
        f"trap '{note_and_leave.format(name)}' {name}\n" for name in ("USR2", "TERM")) + "kill -TERM $PPID\nwait\n")
    assert done.returncode == 0, done.stderr
    assert (state / "got").read_text() == "1 USR2\n" and (state / "steps").read_text() == "1\n"
    assert (state / "requeued").read_text() == "7\n"
    assert "stopped by TERM: requeued (restart 1 of at most 30)" in done.stderr


@pytest.mark.parametrize("job_state, reason, requeued", [("COMPLETING", "None", False), ("CANCELLED", "None", False),
                                                        ("COMPLETING", "TimeLimit", True)])
def test_a_cancelled_job_is_not_requeued(tmp_path, job_state, reason, requeued):
    """A plain scancel sends TERM, as a pre-emption does, and Slurm requeues a cancelled job when asked: the run
    trained on to its end, and the jobs waiting on it with it. Slurm shows a cancelled job COMPLETING for no reason
    (measured on the local cluster), then CANCELLED; past its time limit, COMPLETING for TimeLimit, and a step still
    saving then is requeued (Slurm accepts the requeue of a completing job)."""
    done, state = run_recipe_under_fake_slurm(tmp_path, "exit 75\n", job_state=job_state, reason=reason)
    assert (state / "requeued").exists() == requeued
    if not requeued:
        assert done.returncode == 75
        assert f"the job is cancelled ({job_state} with no reason given): not requeued" in done.stderr


@pytest.mark.parametrize("signalled_step", [2, 3])
def test_a_step_that_finished_its_work_is_not_requeued_for_a_late_signal(tmp_path, signalled_step):
    """A stop signal while a step ends its work with status 0: the job requeues before the next step (after the last
    one, not at all: a requeue there ran the whole job again, and with MAX_REQUEUES spent failed it)."""
    # the program has done its work: it ignores the signal srun passes on and ends with 0
    done, state = run_recipe_under_fake_slurm(
        tmp_path, f'trap "" USR2\n[ "$n" = {signalled_step} ] && kill -USR2 $PPID\nsleep 0.2\nexit 0\n')
    assert done.returncode == 0, done.stderr
    last = signalled_step == 3
    assert (state / "steps").read_text() == f"{signalled_step}\n"
    assert (state / "requeued").exists() != last


def test_a_queue_that_cannot_be_read_submits_nothing(tmp_path):
    """Without squeue's answer every unfinished run would look idle and be submitted again."""
    env = fake_slurm(tmp_path)
    _executable(tmp_path / "slurm" / "squeue", "#!/bin/bash\necho 'slurm_load_jobs error: timeout' >&2; exit 1\n")
    command = [sys.executable, "launch.py", "--grid", str(grid_file(tmp_path)), "--output_root", str(tmp_path / "runs")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "squeue did not answer" in done.stderr and not (tmp_path / "slurm" / "sbatch.log").exists()
    planned = subprocess.run([*command, "--dry-run"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert planned.returncode == 0 and "warning: squeue did not answer" in planned.stderr


def test_jobs_slurm_may_never_start_are_named(tmp_path):
    """More nodes than the partition has: Slurm (without EnforcePartLimits) accepts the jobs and keeps them pending;
    launch.py said "submitted", and --wait waited without a word. Named once, after submitting or while waiting (the
    same reasons stand while nodes are drained, and clear: --wait goes on waiting; here the queue empties at the
    fifth look)."""
    env = fake_slurm(tmp_path)
    (tmp_path / "slurm" / "queue").write_text("101_0 PartitionConfig\n101_1 PartitionNodeLimit\n99 Priority\n")
    _executable(tmp_path / "slurm" / "squeue", '#!/bin/bash\nn=$(( $(cat "$FAKE_SLURM/looks") + 1 ))\n'
                'echo "$n" > "$FAKE_SLURM/looks"\n[ "$n" -lt 5 ] && cat "$FAKE_SLURM/queue"; exit 0\n')
    command = [sys.executable, "launch.py", "--grid", str(grid_file(tmp_path)), "--output_root", str(tmp_path / "runs")]
    said = ("warning: Slurm keeps job(s) 101_0 (PartitionConfig), 101_1 (PartitionNodeLimit) pending for a reason "
            "that may never clear")
    for flags in ([], ["--wait"]):
        shutil.rmtree(tmp_path / "runs", ignore_errors=True)
        (tmp_path / "slurm" / "next").write_text("100")  # the same job ids each time
        (tmp_path / "slurm" / "looks").write_text("0")
        done = subprocess.run([*command, *flags], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == bool(flags), done.stderr  # (the stand-in Slurm runs no job: no run finished)
        assert len(done.stderr.splitlines()) == 1 + bool(flags) and done.stderr.startswith(said), done.stderr
    assert "all jobs left the queue" in done.stdout


@pytest.mark.parametrize("value", ["USR1", "SIGUSR2"])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["launch", "dry-run"])
def test_a_preemption_signal_the_programs_do_not_save_on_is_refused(tmp_path, value, dry_run):
    """submitit would put its requeue on USR1, which the programs hand to USR2's handler (saved, never requeued); it
    reads the name after "SIG", so SIGUSR2 would make every job fail. A --dry-run printed the plan without a word."""
    env = {**fake_slurm(tmp_path), "SUBMITIT_PREEMPT_SIGNAL": value}
    done = subprocess.run([sys.executable, "launch.py", "--grid", str(grid_file(tmp_path)), "--output_root",
                           str(tmp_path / "runs"), *dry_run], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and done.stdout == "", done.stderr
    assert f"SUBMITIT_PREEMPT_SIGNAL={value}:" in done.stderr and "set it to USR2" in done.stderr
    assert not (tmp_path / "slurm" / "sbatch.log").exists()


def test_a_requeued_sbatch_job_of_a_run_holds_it(tmp_path):
    """An sbatch script's job pending again after a requeue holds no lock: the run was planned `resume` and a
    second job submitted, which the first met (\"in use by\") when it started again."""
    env = fake_slurm(tmp_path)
    run = tmp_path / "runs" / "swav_digits_1ep_s0"
    (run / "slurm").mkdir(parents=True)
    (run / "slurm" / "313.out").symlink_to(tmp_path / "experiments_logs_swav_digits_313.out")
    (tmp_path / "slurm" / "queue").write_text("313 BeginTime\n")
    command = [sys.executable, "launch.py", "--grid", str(grid_file(tmp_path)), "--output_root",
               str(tmp_path / "runs")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert next(line for line in done.stdout.splitlines() if line.startswith("swav_digits_1ep_s0 ")).split()[1] == \
        "held"
    assert (f"swav_digits_1ep_s0 is in use by Slurm job 313 of an sbatch script (in the queue; its log is linked as "
            f"{str(run / 'slurm' / '313.out')!r}): not submitted, nor evaluated, nor the stages after it; launch again "
            f"once it has ended") in done.stdout.splitlines()
    submitted = (tmp_path / "slurm" / "sbatch.log").read_text().splitlines()
    assert len(submitted) == 1  # the 2-epoch run's only
    (tmp_path / "slurm" / "queue").write_text("")  # the job has left the queue: the run is the grid's again
    shutil.rmtree(run.parent / "swav_digits_2ep_s0")
    done = subprocess.run([*command, "--dry-run"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert next(line for line in done.stdout.splitlines() if line.startswith("swav_digits_1ep_s0 ")).split()[1] == \
        "resume"


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
                     tmp_path / "runs")
    run = grid.runs[0]
    # 6 is past the run's 4 epochs; 4 is its final checkpoint's weights, evaluated once (two jobs would train one
    # linear probe folder at once)
    assert run.flags["checkpoint_epochs"] == [2]
    assert [e.checkpoint for e in run.evals] == ["checkpoint_ep0002.pth", "checkpoint.pth"]
    assert [e.weights_epoch for e in run.evals] == [2, 4]


def test_grid_evaluations_named_twice_are_planned_once(tmp_path):
    """Two jobs evaluating one checkpoint alike (appending the same record side by side) for a program or an epoch
    the grid lists twice."""
    grid = load_grid(grid_file(tmp_path, axes={"epochs": [4]}, evals={"programs": ["eval_knn.py", "eval_knn.py"],
                                                                     "epochs": [2, 2]}), tmp_path / "runs")
    assert [(e.program, e.checkpoint) for e in grid.runs[0].evals] == [("eval_knn.py", "checkpoint_ep0002.pth")]


def test_grid_evaluation_epochs_add_to_the_configs_checkpoint_epochs(tmp_path):
    """--checkpoint_epochs on the command line replaces the config's list: the grid passes both."""
    grid = load_grid(grid_file(tmp_path, config="configs/npid_cifar10.yaml", flags={}, axes={"seed": [0]},
                               evals={"programs": ["eval_knn.py"], "epochs": [120, 200]}), tmp_path / "runs")
    assert grid.runs[0].flags["checkpoint_epochs"] == [50, 100, 120, 150, 200]


@pytest.mark.parametrize("config, eval_flags, refusal", [
    ("configs/swav_digits.yaml", {"eval_cluster.py": {"assignment": "heads"}}, "method 'swav' has no heads"),
    ("configs/swav_digits.yaml", {"eval_knn.py": {"train_features": "memory_bank", "features": "embedding"}},
     "method 'swav' keeps no memory bank"),
    ("configs/npid_fashion_mnist.yaml", {"eval_knn.py": {"train_features": "memory_bank"}},
     "--train_features memory_bank needs --features embedding"),
    ("configs/npid_fashion_mnist.yaml", {"eval_knn.py": {"train_features": "memory_bank", "features": "embedding"}},
     None),
    ("configs/sela_fashion_mnist.yaml", {"eval_cluster.py": {"clusters": [10, 20]}},
     "--clusters applies to k-means, and a run of sela is scored by its heads"),
    ("configs/sela_fashion_mnist.yaml", {"eval_cluster.py": {"assignment": "kmeans", "clusters": [10, 20]}}, None),
    ("configs/swav_digits.yaml", {"eval_cluster.py": {"clusters": [10, 20], "restarts": 2}}, None),
    ("configs/swav_digits.yaml", {"eval_linear.py": {"cached_features": True, "compile": True}},
     "--compile does nothing with --cached_features true"),
    ("configs/swav_digits.yaml", {"eval_linear.py": {"sync_bn": True}}, "--sync_bn does nothing in a linear probe"),
    # the record goes to the run: the job was refused after its training
    ("configs/swav_digits.yaml", {"eval_knn.py": {"output_dir": "elsewhere"}},
     "--output_dir 'elsewhere' is where a --baseline's record goes"),
    ("configs/swav_digits.yaml", {"eval_cluster.py": {"output_dir": "elsewhere"}}, "a run's go to its own"),
    # the pixel baseline scores no run: every such job would be refused, the grid naming the run
    ("configs/sela_fashion_mnist.yaml", {"eval_cluster.py": {"baseline": "pixels"}}, "--baseline scores raw pixels"),
    # a value argparse cannot read back from a command line is still the grid's one-line error
    ("configs/swav_digits.yaml", {"eval_knn.py": {"data_path": "-x", "k": [20, 200]}}, None),
])
def test_evaluation_flags_the_runs_method_cannot_take_are_refused_before_anything_is_submitted(
        tmp_path, config, eval_flags, refusal):
    """A grid whose evaluations would be refused once its training jobs had run (hours later, after the training
    was paid for) is refused when it is read, naming the run, the program and the flag."""
    spec = grid_file(tmp_path, program=None, config=config, flags={}, axes={"seed": [0]},
                     evals={"programs": list(eval_flags), "flags": eval_flags})
    if refusal is None:
        assert load_grid(spec, tmp_path / "runs").runs[0].evals
        return
    with pytest.raises(ConfigError, match=r"run '\w+': eval_\w+\.py .*" + re.escape(refusal)):
        load_grid(spec, tmp_path / "runs")


@pytest.mark.parametrize("config, flags, refused", [
    (None, {"lr_drops": [1]}, True),                                               # SwAV's cosine schedule
    ("configs/npid_fashion_mnist.yaml", {"schedule": "cosine"}, True),             # the config's drops, 4 5
    ("configs/npid_fashion_mnist.yaml", {"schedule": "cosine", "lr_drops": []}, False),
    ("configs/npid_cifar10.yaml", {"schedule": "cosine"}, False),                  # NPID's own drops, 120 160
])
def test_drops_without_a_step_schedule_are_refused_before_anything_is_submitted(tmp_path, config, flags, refused):
    """A job given --lr_drops under a schedule without drops refuses to start: its grid is refused when read, not
    after the jobs were queued; a method's own drops (NPID's 120 160) do not count, as in the job."""
    spec = grid_file(tmp_path, **({"config": config, "flags": flags} if config else
                                  {"flags": {**BASE["flags"], **flags}}))
    if not refused:
        assert load_grid(spec, tmp_path / "runs").runs
        return
    with pytest.raises(ConfigError, match=r"^grid '.*' run '\w+': --lr_drops [\d ]+ does nothing in this run: it "
                                          r"applies to --schedule step"):
        load_grid(spec, tmp_path / "runs")


def test_a_pipelines_evaluations_are_checked_against_its_last_stages_method(tmp_path):
    """EmbedUL's stage 2 on Super-AND: the evaluations score the stage-2 run, which keeps no memory bank."""
    stages = [{"name": "embed", "config": "configs/superand_fashion_mnist.yaml"},
              {"name": "assign", "config": "configs/embedul_fashion_mnist.yaml", "pretrained_from": "embed"}]
    evals = {"programs": ["eval_knn.py"],
             "flags": {"eval_knn.py": {"train_features": "memory_bank", "features": "embedding"}}}
    spec = {"name": "p", "stages": stages, "axes": {"seed": [0]}, "evals": evals}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ConfigError, match="eval_knn.py --train_features memory_bank: method 'embedul' keeps no"):
        load_grid(path, tmp_path / "runs")


def test_a_recipes_evaluations_are_checked_against_its_last_stages_method(tmp_path):
    recipe = {"stages": [{"name": "embed", "config": str(ROOT / "configs" / "superand_fashion_mnist.yaml")},
                         {"name": "assign", "config": str(ROOT / "configs" / "embedul_fashion_mnist.yaml"),
                          "pretrained_from": "embed"}],
              "evals": ["eval_cluster.py"], "eval_flags": {"eval_cluster.py": {"restarts": 3}}}
    path = tmp_path / "recipes.yaml"
    path.write_text(yaml.safe_dump({"two": recipe}))
    with pytest.raises(ConfigError, match="recipe 'two': eval_cluster.py --restarts applies to k-means, and a run of "
                                          "embedul is scored by its heads"):
        recipe_scripts(path)
    recipe["eval_flags"]["eval_cluster.py"]["assignment"] = "kmeans"
    path.write_text(yaml.safe_dump({"two": recipe}))
    assert "--restarts 3" in recipe_scripts(path)["two"]


@pytest.mark.parametrize("recipes, words", [
    # a traceback
    ({"a": {"epochs": 5}}, "recipe 'a': epochs 5 must be a list of positive whole numbers"),
    ({"a": {"epochs": [5, "x"]}}, "recipe 'a': epochs [5, 'x'] must be a list"),
    # one a.sh with the last value: the 5-epoch script lost without a word
    ({"a": {"epochs": [5, 6]}}, "recipe 'a' lists 2 epoch values, but its name has no {epochs}"),
    ({"a_{epochs}ep": {"epochs": [5]}, "a_5ep": {}}, "recipe 'a_5ep': two recipes write the script a_5ep.sh"),
    # named a grid
    ({"a": {"resources": {"nodes": 0}}}, "recipes file '"),
])
def test_recipe_files_that_would_lose_or_misname_a_script_are_refused(tmp_path, recipes, words):
    for recipe in recipes.values():
        recipe.setdefault("config", str(ROOT / "configs" / "swav_digits.yaml"))
    path = tmp_path / "recipes.yaml"
    path.write_text(yaml.safe_dump(recipes))
    with pytest.raises(ConfigError) as caught:
        recipe_scripts(path)
    assert words in str(caught.value), str(caught.value)


@pytest.mark.slow
def test_emitted_recipe_scripts_name_the_folder_they_are_written_to(tmp_path):
    out = tmp_path / "my_sbatch"
    done = run_launch("--emit-sbatch", "--sbatch_dir", str(out))
    assert done.returncode == 0, done.stderr
    script = (out / "unmix_c10_400ep.sh").read_text()
    assert f"# Usage (from the repository root): sbatch {out}/unmix_c10_400ep.sh" in script


def test_eval_resources_default_key_by_key_to_the_training_resources(tmp_path):
    """Each key eval_resources leaves out is the training job's, except its shape: an evaluation runs on one node,
    a task per GPU."""
    grid = load_grid(grid_file(tmp_path, resources={"nodes": 2, "gpus_per_node": 2, "partition": "gpu",
                                                    "account": "proj1", "mem_gb": 50},
                               eval_resources={"timeout_min": 30, "gpus_per_node": 1}), tmp_path / "runs")
    assert grid.eval_resources == {**grid.resources, "timeout_min": 30, "gpus_per_node": 1, "tasks_per_node": 1,
                                   "nodes": 1}
    assert (grid.resources["nodes"], grid.resources["tasks_per_node"]) == (2, 2)
    assert grid.eval_resources["account"] == "proj1"
    alike = load_grid(grid_file(tmp_path, resources={"nodes": 2, "gpus_per_node": 2}), tmp_path / "runs")
    assert alike.eval_resources == alike.resources  # no eval_resources: the training job's, shape included


def test_pending_evaluations_follow_the_epoch_and_the_flags_the_grid_asks_for(tmp_path):
    """A record of checkpoint.pth from before the run's last epoch is of other weights; flags the grid changed since
    the last evaluation job that succeeded ask for another one (the program's --skip_recorded then runs only what
    is new), until a job with them succeeds."""
    from clusterlab.programs.launch import pending_evals, record_job

    def run_for(knn_flags):
        return load_grid(grid_file(tmp_path, axes={"epochs": [4], "seed": [0]},
                                   evals={"programs": ["eval_knn.py"], "flags": {"eval_knn.py": knn_flags}}),
                         tmp_path / "runs").runs[0]

    run = run_for({"k": [200]})
    run.run_dir.mkdir(parents=True)
    metrics = run.run_dir / "metrics.jsonl"

    def knn_record(epoch):
        return json.dumps({"eval": "knn", "checkpoint": "checkpoint.pth", "dataset": "digits", "epoch": epoch,
                           "step": 0, "protocol": {"k": 200}, "metrics": {}}) + "\n"

    metrics.write_text(knn_record(2))  # evaluated by hand while the run was at epoch 2
    assert list(pending_evals(run, set())) == ["checkpoint.pth"]
    [(program, argv)] = pending_evals(run, set())["checkpoint.pth"]
    metrics.write_text(knn_record(2) + knn_record(4))
    assert pending_evals(run, set()) == {}
    def job(job_id, commands, done):
        submitted = type("Job", (), {"job_id": job_id, "paths": type("Paths", (), {"folder": str(tmp_path)})()})()
        record_job(run, submitted, "eval checkpoint.pth", "checkpoint.pth", commands)
        if done:  # what ProgramJob appends once its programs succeeded
            rundir.append_jsonl(run.run_dir / "slurm" / "jobs.jsonl", {"job_id": job_id, "done": "then"})

    job("7", [(program, argv)], done=True)
    assert pending_evals(run, set()) == {}
    changed = run_for({"k": [20]})
    [(_, changed_argv)] = pending_evals(changed, set())["checkpoint.pth"]
    job("8", [(program, changed_argv)], done=False)  # failed: asked again
    assert list(pending_evals(changed, set())) == ["checkpoint.pth"]
    job("9", [(program, changed_argv)], done=True)
    assert pending_evals(changed, set()) == {}
    # a job of the same flags that ended without succeeding may have written some of its records (one K of several):
    # asked again while it is not in the queue
    job("10", [(program, changed_argv)], done=False)
    assert pending_evals(changed, {"10"}) == {}
    assert list(pending_evals(changed, set())) == ["checkpoint.pth"]
    job("11", [(program, changed_argv)], done=True)
    assert pending_evals(changed, set()) == {}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "grids").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_grid_expands_into_valid_runs(path, tmp_path, monkeypatch):
    """Each grid in configs/grids/ loads (every flag checked against its program) into distinctly named runs, also
    from outside the repository (its configs are found above the grid file)."""
    monkeypatch.chdir(tmp_path)
    grid = load_grid(path, output_root=tmp_path)
    names = [run.name for run in grid.runs]
    assert names and len(set(names)) == len(names)
    assert all(run.program in ("main_pretrain.py", "main_cluster.py") for run in grid.runs)


def tiny_project(tmp_path: Path, width: int = 4) -> Path:
    """project/grids/tiny.yaml (one 1-epoch SwAV run on digits) naming its config as `configs/tiny.yaml`, which
    lies in project/configs/, as a user's own project would keep them."""
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "grids").mkdir()
    write_tiny_config(project / "configs" / "tiny.yaml", width)
    (project / "grids" / "tiny.yaml").write_text(yaml.safe_dump(
        {"name": "tiny", "config": "configs/tiny.yaml", "axes": {"seed": [0]}}))
    return project


def write_tiny_config(path: Path, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"base": str(ROOT / "configs" / "swav_digits.yaml"), "width": width,
                                    "hidden_mlp": 32, "feat_dim": 16, "nmb_prototypes": 10, "batch_size": 64,
                                    "size_crops": [8], "epochs": 1, "device": "cpu"}))


def test_relative_config_is_read_from_the_current_directory_else_above_the_grid(tmp_path, monkeypatch):
    from clusterlab.programs.train import parse_args

    project = tiny_project(tmp_path, width=6)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run = load_grid(project / "grids" / "tiny.yaml", "runs").runs[0]
    assert run.flags["config"] == str(project / "configs" / "tiny.yaml")  # absolute: jobs find it from anywhere
    assert parse_args("pretrain", run.argv()).width == 6
    # A file of that name in the current directory comes first, and is named as the grid wrote it.
    write_tiny_config(elsewhere / "configs" / "tiny.yaml", width=8)
    run = load_grid(Path("..") / "project" / "grids" / "tiny.yaml", "runs").runs[0]
    assert run.flags["config"] == "configs/tiny.yaml"
    assert parse_args("pretrain", run.argv()).width == 8
    # Recipes follow the same rule; the script names the config as the recipe wrote it.
    (elsewhere / "configs" / "tiny.yaml").unlink()
    (project / "recipes.yaml").write_text(yaml.safe_dump({"tiny": {"config": "configs/tiny.yaml"}}))
    script = recipe_scripts(project / "recipes.yaml")["tiny"]
    assert "--config configs/tiny.yaml" in script


@pytest.mark.slow
def test_installed_wheel_launches_a_grid_from_any_directory(tmp_path):
    """A wheel built from the tree and installed into a folder of its own: its `clusterlab-launch` command, started
    outside the repository, trains a grid's run through submitit's local executor, whose job (a new process)
    imports the installed copy too: the run's config.yaml records no commit, as a copy outside a git checkout does
    (a job importing the repository's source would record its commit)."""
    source = tmp_path / "source"
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "wheel", source],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("clusterlab-*.whl")
    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], capture_output=True,
                               text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    project = tiny_project(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import clusterlab; print(clusterlab.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(site / "clusterlab" / "__init__.py"), where.stderr
    done = subprocess.run([site / "bin" / "clusterlab-launch", "--grid", "../project/grids/tiny.yaml", "--cluster",
                           "local", "--wait"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "swav_digits_s0: finished" in done.stdout, done.stdout
    run_dir = work / "runs" / "tiny" / "swav_digits_s0"
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded["args"]["config"] == str(project / "configs" / "tiny.yaml")
    assert recorded["args"]["output_dir"] == str(run_dir)
    assert recorded["git_commit"] is None and recorded["git_dirty"] is None
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


@pytest.mark.slow
def test_wait_ends_with_status_1_when_an_evaluation_job_failed(tmp_path):
    """`launch.py --wait && collect_results.py` tabulated a grid whose evaluation had failed: --wait ended with
    status 0 whatever its jobs did. A training that finishes and an evaluation that fails (more clusters than
    images) is status 1, with a line naming the run; the same grid's evaluation mended is status 0."""
    flags = {**BASE["flags"], "epochs": 1, "batch_size": 64, "size_crops": [8], "device": "cpu"}
    for clusters, status in ((5000, 1), (10, 0)):
        grid = grid_file(tmp_path, axes={"seed": [0]}, flags=flags,
                         evals={"programs": ["eval_cluster.py"],
                                "flags": {"eval_cluster.py": {"clusters": clusters, "restarts": 1, "plot": False}}})
        out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--cluster", "debug")
        assert out.returncode == status, out.stderr
        assert "  swav_digits_s0: finished" in out.stdout.splitlines(), out.stdout
        assert out.stderr == (ONE_RUN_INCOMPLETE if status else ""), out.stderr


@pytest.mark.slow
def test_local_jobs_after_a_failed_training_are_not_submitted(tmp_path):
    """submitit's local executor knows no afterok: launch.py waits for a training job before it submits the
    evaluations that depend on it, and submits none when training failed (here: no CIFAR-10 files).
    The job fails in the program, not before it: a MASTER_PORT left in the submitting shell (jobs inherit its
    environment) made submitit's export of the job's own rendezvous refuse every job."""
    grid = grid_file(tmp_path, axes={"seed": [0]}, evals={"programs": ["eval_knn.py"]},
                     flags={**BASE["flags"], "dataset": "cifar10", "data_path": str(tmp_path / "no_data"),
                            "epochs": 1, "device": "cpu"})
    out = run_launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--cluster", "local", "--wait",
                     MASTER_PORT="29500", WORLD_SIZE="8")
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("launch.py: 1 of 1 runs did not finish, or an evaluation job of theirs failed "
                                 "(swav_cifar10_s0)"), out.stderr
    lines = out.stdout.splitlines()
    assert lines[-4].startswith("submitted 1 training job(s): ")
    job = lines[-4].split()[-1]
    assert lines[-3].startswith(f"job {job} failed: clusterlab.errors.DataError: dataset 'cifar10': data path ")
    assert lines[-2:] == ["all jobs ended", "  swav_cifar10_s0: no status.json: its job failed before training "
                                            "started, or never ran (cancelled, or a job it waited for failed)"]
    assert "submitted 1 evaluation job" not in out.stdout


@pytest.mark.parametrize("argv, expected", [([], True), (["--dry-run", "false"], False), (["--dry-run"], True),
                                            (["--wait", "--emit-sbatch", "no"], True)])
def test_launch_switches_set_in_a_config_can_be_turned_off(tmp_path, argv, expected):
    """launch.py's switches were store_true: a config's `dry_run: true` could not be undone on the command line
    (`--dry-run false`: unrecognized arguments), unlike every other program's true/false flags."""
    from clusterlab import config
    from clusterlab.programs.launch import get_args_parser

    path = tmp_path / "launch.yaml"
    path.write_text("dry_run: true\nemit_sbatch: true\n")
    args = config.parse(get_args_parser(), ["--config", str(path), *argv])
    assert args.dry_run is expected
    if "--wait" in argv:
        assert args.wait is True and args.emit_sbatch is False


def test_a_grid_naming_both_units_of_one_length_is_refused_before_submitting(tmp_path):
    """A grid's flags and axes all go onto each job's one command line, which refuses both: refused at plan time,
    not in every job."""
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "program": "main_pretrain.py",
                                    "config": str(ROOT / "configs" / "swav_digits.yaml"),
                                    "flags": {"width": 4, "freeze_prototypes_niters": 2},
                                    "axes": {"freeze_prototypes_epochs": [0, 1]}}))
    with pytest.raises(ConfigError, match="--freeze_prototypes_epochs and --freeze_prototypes_niters give one length"):
        load_grid(path, tmp_path / "runs")
    # one in the config file (swav_digits.yaml: freeze_prototypes_niters), the other in the grid's flags: the job's
    # command line replaces the file's, as the program does
    path.write_text(yaml.safe_dump({"name": "g", "program": "main_pretrain.py",
                                    "config": str(ROOT / "configs" / "swav_digits.yaml"),
                                    "flags": {"width": 4, "freeze_prototypes_epochs": 1}, "axes": {"seed": [0, 1]}}))
    assert len(load_grid(path, tmp_path / "runs").runs) == 2


def test_emit_sbatch_with_dry_run_names_the_scripts_and_writes_none(tmp_path):
    """--dry-run ("print the plan, submit nothing") was not read by --emit-sbatch: it wrote every script, into the
    repository's sbatch/ by default. A folder that cannot be made is one line, not a traceback."""
    out = tmp_path / "scripts"
    done = run_launch("--emit-sbatch", "--dry-run", "--sbatch_dir", str(out))
    assert done.returncode == 0, done.stderr
    assert f"would write {out / 'unmix_c10_400ep.sh'}" in done.stdout.splitlines() and not out.exists()
    refused = run_launch("--emit-sbatch", "--sbatch_dir", "/proc/clusterlab_no_folder")
    assert refused.returncode == 2 and refused.stderr.strip() == (
        "launch.py: error: cannot create the sbatch folder '/proc/clusterlab_no_folder' (No such file or directory): "
        "choose another --sbatch_dir")
