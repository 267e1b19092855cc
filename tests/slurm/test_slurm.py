"""launch.py, pre-emption and sbatch scripts against the real local Slurm cluster (tests/slurm/local_cluster.sh).

Without a cluster these tests skip with the reason; with CLUSTERLAB_REQUIRE_SLURM=1 (.ci/run sets it) a missing
cluster fails them instead.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from slurm_helpers import (ROOT, TINY, cancelled_on_exit, env, launch, records, require_cluster, wait_for_lines,
                           wait_job, write_grid)

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="session")
def slurm():
    require_cluster()


def test_grid_runs_trains_evaluates_and_collects(slurm, tmp_path):
    grid = write_grid(tmp_path / "grid.yaml", name="t", program="main_pretrain.py", config="configs/swav_digits.yaml",
                      axes={"epochs": [1, 2], "seed": [0, 1]}, flags={**TINY, "batch_size": 64, "log_every": 50},
                      evals={"programs": ["eval_knn.py", "eval_cluster.py"],
                             "flags": {"eval_cluster.py": {"restarts": 2, "plot": False}}},
                      resources={"cpus_per_task": 1, "mem_gb": 2, "timeout_min": 20})
    out = launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--wait")
    assert "submitted 4 training job(s)" in out.stdout and "submitted 4 evaluation job(s)" in out.stdout
    runs = sorted((tmp_path / "runs").glob("swav_digits_*"))
    assert [r.name for r in runs] == ["swav_digits_1ep_s0", "swav_digits_1ep_s1", "swav_digits_2ep_s0",
                                      "swav_digits_2ep_s1"]
    for run in runs:
        assert json.loads((run / "status.json").read_text())["state"] == "finished"
        kinds = sorted(r["eval"] for r in records(run))
        assert kinds == ["cluster", "knn"], (run, kinds)
        jobs = [json.loads(line) for line in (run / "slurm" / "jobs.jsonl").read_text().splitlines()]
        [evaluation] = [job["job_id"] for job in jobs if job.get("kind") == "eval"]
        assert [job["job_id"] for job in jobs if job.get("done")] == [evaluation]  # the job said it succeeded
    # launching again finds everything done and submits nothing
    again = launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"))
    assert "submitted" not in again.stdout and again.stdout.count("finished") == 4
    table = subprocess.run([sys.executable, "collect_results.py", "--root", str(tmp_path / "runs"), "--out",
                            str(tmp_path / "results"), "--published", ""], cwd=ROOT, capture_output=True, text=True,
                           env=env())
    assert table.returncode == 0, table.stderr
    assert (tmp_path / "results" / "digits.csv").is_file()
    assert "| digits | swav |" in table.stdout


def test_preempted_twice_resumes_bit_identical(slurm, tmp_path):
    # 12 epochs of 28 steps: after the second signal at most 80 of 336 steps are done, so the run cannot finish before
    # a signal arrives (a fast CPU trains 28 steps a second; scancel to the task takes seconds on a loaded machine).
    epochs = 12
    flags = {**TINY, "batch_size": 32, "epochs": epochs, "log_every": 1}
    grid = write_grid(tmp_path / "grid.yaml", name="p", program="main_pretrain.py", config="configs/swav_digits.yaml",
                      axes={"seed": [0]}, flags=flags, resources={"cpus_per_task": 1, "mem_gb": 2, "timeout_min": 20})
    launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"))
    run = tmp_path / "runs" / "swav_digits_s0"
    job = json.loads((run / "slurm" / "jobs.jsonl").read_text().splitlines()[0])["job_id"]
    with cancelled_on_exit(job):  # a failure would otherwise leave it holding the partition for its 20-minute limit
        # mid-epoch 2 and mid-epoch 3 (28 steps per epoch, one log line per step): submitit's time-limit signal, then
        # a TERM while Slurm keeps the job running (scancel -s TERM), on which submitit's own handler only logs
        for lines, stop in ((30, "USR2"), (80, "TERM")):
            wait_for_lines(run, lines, job_id=job)
            subprocess.run(["scancel", f"--signal={stop}", job], check=True)
            deadline = time.time() + 60
            while json.loads((run / "status.json").read_text()).get("state") != "interrupted":
                assert time.time() < deadline, f"the run did not save on SIG{stop}"
                time.sleep(0.2)
        wait_job(job)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    log = (run / "train_log.jsonl").read_text()
    reference = tmp_path / "reference"
    argv = [f"--{k}={v}" if not isinstance(v, list) else f"--{k}={v[0]}" for k, v in flags.items()]
    subprocess.run([sys.executable, "main_pretrain.py", "--config", "configs/swav_digits.yaml", *argv, "--seed", "0",
                    "--output_dir", str(reference)], cwd=ROOT, env=env(), check=True, capture_output=True)
    ours = torch.load(run / "checkpoint.pth", weights_only=True)
    theirs = torch.load(reference / "checkpoint.pth", weights_only=True)
    assert ours["global_step"] == theirs["global_step"] == epochs * 28
    for key in theirs["model"]:
        assert torch.equal(ours["model"][key], theirs["model"][key]), key
    assert log.count('"epoch_end": true') == epochs


def test_generated_sbatch_script_runs_and_requeues(slurm, tmp_path):
    run = tmp_path / "run"
    job = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={tmp_path}/%j.out", "sbatch/swav_digits.sh",
         "--epochs", "8", "--width", "4", "--hidden_mlp", "32", "--feat_dim", "16", "--size_crops", "8",
         "--batch_size", "32", "--log_every", "1"],
        env=env(EXPERIMENT_PATH=str(run), PYTHON=sys.executable, EVAL_CLUSTER_ARGS="--restarts 2 --plot false"),
        capture_output=True, text=True, check=True).stdout.strip()
    wait_for_lines(run, 20, job_id=job)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_job(job)
    output = (tmp_path / f"{job}.out").read_text()
    assert "SIGUSR2: saved" in output, output[-2000:]
    assert re.search(r"from (epoch \d+ step \d+/\d+|the end of epoch \d+) ->", output), "the requeued job did not resume"
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert sorted(r["eval"] for r in records(run)) == ["cluster", "knn"]
    # the run directory links to the job's log, wherever sbatch was told to write it
    assert (run / "slurm" / f"{job}.out").resolve() == tmp_path / f"{job}.out"


def test_output_dir_argument_moves_the_evaluations_and_the_log_stays_out_of_the_repository_root(slurm, tmp_path):
    """sbatch sbatch/swav_digits.sh --output_dir DIR, with the script's own #SBATCH --output: training and both
    evaluations use DIR, and the log is experiments/logs/swav_digits_JOBID.out, linked from DIR/slurm/."""
    run = tmp_path / "moved"
    before = set(ROOT.iterdir())
    job = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={ROOT}", "sbatch/swav_digits.sh", "--epochs", "1", "--width", "4",
         "--hidden_mlp", "32", "--feat_dim", "16", "--size_crops", "8", "--batch_size", "64", "--output_dir", str(run)],
        env=env(EXPERIMENT_PATH=str(tmp_path / "unused"), PYTHON=sys.executable,
                EVAL_CLUSTER_ARGS="--restarts 2 --plot false"),
        capture_output=True, text=True, check=True).stdout.strip()
    log = ROOT / "experiments" / "logs" / f"swav_digits_{job}.out"
    try:
        wait_job(job)
        assert json.loads((run / "status.json").read_text())["state"] == "finished", log.read_text()[-3000:]
        assert sorted(r["eval"] for r in records(run)) == ["cluster", "knn"], log.read_text()[-3000:]
        assert (run / "slurm" / f"{job}.out").resolve() == log and "epoch" in log.read_text()
        assert not (tmp_path / "unused").exists()
        assert set(ROOT.iterdir()) == before
    finally:
        log.unlink(missing_ok=True)


def test_sbatch_refusing_a_grid_job_is_one_line(slurm, tmp_path):
    grid = write_grid(tmp_path / "grid.yaml", name="r", program="main_pretrain.py", config="configs/swav_digits.yaml",
                      axes={"seed": [0]}, flags={**TINY, "epochs": 1},
                      resources={"cpus_per_task": 1, "mem_gb": 2, "timeout_min": 5, "partition": "nosuch"})
    done = launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), check=False)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("launch.py: error: sbatch refused the training job(s) of swav_digits_s0: ")
    assert "nosuch" in lines[0] or "partition" in lines[0].lower()


def finished_run_with_a_knn_grid(tmp_path: Path) -> tuple[Path, Path]:
    """A run of one epoch trained by hand, and a grid of it whose kNN evaluation is still to be made."""
    flags = {**TINY, "batch_size": 64, "epochs": 1}
    grid = write_grid(tmp_path / "grid.yaml", name="e", program="main_pretrain.py", config="configs/swav_digits.yaml",
                      axes={"seed": [0]}, flags=flags, evals={"programs": ["eval_knn.py"]},
                      resources={"cpus_per_task": 1, "mem_gb": 2, "timeout_min": 20})
    run = tmp_path / "runs" / "swav_digits_s0"
    argv = [f"--{k}={v[0] if isinstance(v, list) else v}" for k, v in flags.items()]
    subprocess.run([sys.executable, "main_pretrain.py", "--config", "configs/swav_digits.yaml", *argv, "--seed", "0",
                    "--output_dir", str(run)], cwd=ROOT, env=env(), check=True, capture_output=True)
    return grid, run


def default_partition() -> str:
    partition = subprocess.run(["scontrol", "show", "partition", "--oneliner"], capture_output=True, text=True,
                               check=True).stdout
    return next(line.split()[0].split("=", 1)[1] for line in partition.splitlines() if "Default=YES" in line)


def test_relaunch_does_not_resubmit_a_queued_evaluation(slurm, tmp_path):
    """A finished run whose kNN job is still in the queue (its partition down): launching the grid again submits
    nothing; once the partition is up, the one job runs and one record appears."""
    grid, run = finished_run_with_a_knn_grid(tmp_path)
    # The default partition is down while both launches run: the evaluation job queues but cannot start (a job
    # held after its submission could already have run on a fast machine, or a slow one could still be starting).
    default = default_partition()
    subprocess.run(["scontrol", "update", f"PartitionName={default}", "State=DOWN"], check=True)
    try:
        first = launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"))
        assert "submitted 1 evaluation job(s)" in first.stdout and "finished" in first.stdout
        job = json.loads((run / "slurm" / "jobs.jsonl").read_text())["job_id"]
        again = launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"))
        assert "submitted" not in again.stdout and "queued: final" in again.stdout
    finally:
        subprocess.run(["scontrol", "update", f"PartitionName={default}", "State=UP"], check=True)
    assert len((run / "slurm" / "jobs.jsonl").read_text().splitlines()) == 1
    wait_job(job)
    assert [r["eval"] for r in records(run)] == ["knn"]


def test_wait_waits_for_the_jobs_an_earlier_launch_queued(slurm, tmp_path):
    """launch.py --wait on a grid whose evaluation an earlier launch queued (its partition down) submits nothing and
    waits for that job: it said at once "all jobs left the queue" while the job was still pending."""
    grid, run = finished_run_with_a_knn_grid(tmp_path)
    default = default_partition()
    subprocess.run(["scontrol", "update", f"PartitionName={default}", "State=DOWN"], check=True)
    try:
        assert "submitted 1 evaluation job(s)" in launch("--grid", str(grid), "--output_root",
                                                         str(tmp_path / "runs")).stdout
        waiting = subprocess.Popen([sys.executable, "launch.py", "--grid", str(grid), "--output_root",
                                    str(tmp_path / "runs"), "--wait"], cwd=ROOT, env=env(), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(8)
        still_waiting = waiting.poll() is None
    finally:
        subprocess.run(["scontrol", "update", f"PartitionName={default}", "State=UP"], check=True)
    try:
        out, err = waiting.communicate(timeout=300)
    finally:
        waiting.kill()
    assert still_waiting, out
    assert waiting.returncode == 0, err
    assert "submitted" not in out and out.splitlines()[-2:] == ["all jobs left the queue", "  swav_digits_s0: finished"]
    assert [r["eval"] for r in records(run)] == ["knn"]


def run_recipe_script(tmp_path: Path, script: str, *overrides: str, **eval_args: str) -> tuple[Path, str]:
    """sbatch sbatch/SCRIPT with tiny training overrides on a fabricated CIFAR-10 folder; waits for the job and
    returns the experiment directory and the job's output."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fabricate import make_cifar10

    data = make_cifar10(tmp_path / "data", n_train=128, n_test=64)
    run = tmp_path / "runs" / Path(script).stem
    job = subprocess.run(
        ["sbatch", "--parsable", "--mem=4G", "--cpus-per-task=1", f"--chdir={ROOT}", f"--output={tmp_path}/%j.out",
         f"sbatch/{script}", "--epochs", "2", "--width", "2", "--batch_size", "64", "--amp", "off", *overrides],
        env=env(DATASET_PATH=str(data), EXPERIMENT_PATH=str(run), PYTHON=sys.executable, **eval_args),
        capture_output=True, text=True, check=True).stdout.strip()
    wait_job(job)
    return run, (tmp_path / f"{job}.out").read_text()


def test_unmix_recipe_script_on_fabricated_cifar10(slurm, tmp_path):
    """sbatch/unmix_c10_400ep.sh with tiny overrides: training, then linear, kNN and k-means records."""
    run, output = run_recipe_script(
        tmp_path, "unmix_c10_400ep.sh", "--hidden_mlp", "16", "--feat_dim", "8", "--nmb_prototypes", "10",
        "--log_every", "10",
        EVAL_LINEAR_ARGS="--epochs 1 --batch_size 64", EVAL_CLUSTER_ARGS="--restarts 2 --plot false")
    assert sorted(r["eval"] for r in records(run)) == ["cluster", "knn", "linear"], output[-3000:]
    assert all(r["method"] == "unmix" and r["dataset"] == "cifar10" for r in records(run))
    table = subprocess.run([sys.executable, "collect_results.py", "--root", str(tmp_path / "runs"), "--out",
                            str(tmp_path / "results")], cwd=ROOT, capture_output=True, text=True, env=env())
    assert table.returncode == 0, table.stderr
    assert "| cifar10 | unmix |" in table.stdout
    published = table.stdout.split("Published numbers")[1]
    assert "| unmix " in published and "| 400 " in published and "90.4" in published


def test_embedul_pipeline_grid_super_and_then_stage_2_then_heads(slurm, tmp_path):
    """A grid with stages: Super-AND, then EmbedUL from it (afterok), then eval_cluster on every head."""
    grid = write_grid(tmp_path / "grid.yaml", name="pipe",
                      stages=[{"name": "superand", "program": "main_pretrain.py",
                               "flags": {"method": "superand", "rounds": 2, "epochs_per_round": 1, "epochs": 2,
                                         "schedule_period": 1}},
                              {"name": "embedul", "program": "main_cluster.py", "flags": {"method": "embedul",
                                                                                         "epochs": 2},
                               "pretrained_from": "superand"}],
                      axes={"seed": [0]},
                      flags={"dataset": "digits", "width": 4, "batch_size": 64, "size_crops": [8], "device": "cpu",
                             "log_every": 50},
                      evals={"programs": ["eval_cluster.py"], "flags": {"eval_cluster.py": {"plot": False}}},
                      resources={"cpus_per_task": 1, "mem_gb": 2, "timeout_min": 20})
    out = launch("--grid", str(grid), "--output_root", str(tmp_path / "runs"), "--wait")
    assert "submitted 2 training job(s)" in out.stdout and "submitted 1 evaluation job(s)" in out.stdout
    stage1, stage2 = tmp_path / "runs" / "superand_s0", tmp_path / "runs" / "embedul_s0"
    assert json.loads((stage2 / "status.json").read_text())["state"] == "finished"
    config = (stage2 / "config.yaml").read_text()
    assert f"pretrained: {stage1}" in config
    heads = [r["protocol"] for r in records(stage2)]
    assert sorted(h["head"] for h in heads if h["selection"] == "all-heads") == [0, 1, 2, 3, 4]
    assert sum(h["selection"] == "lowest-loss" for h in heads) == 1
    table = subprocess.run([sys.executable, "collect_results.py", "--root", str(tmp_path / "runs"), "--out",
                            str(tmp_path / "results")], cwd=ROOT, capture_output=True, text=True, env=env())
    assert table.returncode == 0, table.stderr
    rows = [line for line in table.stdout.splitlines() if "| digits | embedul |" in line and "assignment=head" in line]
    assert len(rows) == 6 and sum("head=" in row for row in rows) == 5  # the chosen head's row names no index


def test_npid_recipe_script_on_fabricated_cifar10(slurm, tmp_path):
    """sbatch/npid_c10_200ep.sh with tiny overrides: kNN records that state their train features."""
    run, output = run_recipe_script(tmp_path, "npid_c10_200ep.sh", EVAL_KNN_ARGS="--train_features memory_bank",
                                    EVAL_CLUSTER_ARGS="--restarts 2 --plot false")
    knn = [r for r in records(run) if r["eval"] == "knn"]
    assert len(knn) == 1, output[-3000:]
    assert knn[0]["protocol"]["train_features"] == "memory_bank" and knn[0]["protocol"]["features"] == "embedding"
    assert knn[0]["method"] == "npid" and 0.0 <= knn[0]["metrics"]["top1"] <= 1.0


@pytest.mark.parametrize("script, overrides, evals", [
    ("sela_c10_resnet_400ep.sh", ["--hc", "2", "--ncl", "10", "--nopts", "3", "--label_batch_size", "64"],
     ["cluster", "cluster", "cluster", "knn", "linear"]),
    ("selfclassifier_c10_v1_800ep.sh", ["--cls_size", "10", "--num_cls", "2", "--hidden_dim", "16", "--dim", "8"],
     ["cluster", "cluster", "cluster", "knn"]),
], ids=["sela", "selfclassifier"])
def test_class_assignment_recipe_scripts_on_fabricated_cifar10(slurm, tmp_path, script, overrides, evals):
    """main_cluster.py recipes under sbatch: every head scored, the chosen one once more, and kNN (and linear)."""
    run, output = run_recipe_script(tmp_path, script, *overrides, EVAL_LINEAR_ARGS="--epochs 1 --batch_size 64",
                                    EVAL_CLUSTER_ARGS="--plot false")
    found = records(run)
    assert sorted(r["eval"] for r in found) == evals, output[-3000:]
    heads = [r["protocol"] for r in found if r["eval"] == "cluster"]
    assert sorted(h["head"] for h in heads if h["selection"] == "all-heads") == [0, 1]
    assert sum(h["selection"] == "lowest-loss" for h in heads) == 1
