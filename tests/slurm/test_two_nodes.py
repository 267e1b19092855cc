"""A 2-node x 1-task SwAV training on the local cluster's two-node partition (tests/slurm/local_cluster.sh: clnode1
and clnode2, each a slurmd in its own network namespace with its own host name and address on a private bridge,
so the ranks rendezvous by host name and gloo talks over a real interface).

The same grid (nodes: 2, tasks_per_node: 1) is launched two ways, each interrupted in the middle:
(a) the sbatch script `launch.py --grid ... --emit-sbatch` writes for it, stopped by `scontrol requeue` (SIGTERM,
    what pre-emption and an administrator send; Slurm requeues the job itself);
(b) `launch.py --grid` through submitit, stopped by `scancel --signal=USR2` (submitit's pre-emption / time-limit
    signal; submitit requeues the job).
Each must run rank 0 and rank 1 on two different nodes (each rank prints where it runs before it joins), resume at
the step where it stopped, and end with a checkpoint bit-identical to the same run on 2 processes on one node.

Why the reference is 2 processes on one node and not 1 process: with 2 ranks each computes the gradient of half the
batch and gloo adds the halves (batch-norm statistics and Sinkhorn's sums likewise); 1 process sums over the whole
batch inside each kernel. The same numbers are added in another order, so float32 results differ in the last bits
from the first step on, and SwAV amplifies that. The same world size adds in the same order wherever its ranks run,
which makes 2 processes on one node (torchrun) the bit-for-bit reference. The 1-process run is compared within
1e-3 (max abs difference of the weights) at a small learning rate: measured on this suite's machine, 1 and 2
processes end 1e-5 apart after these 28 steps, while a 2-process run whose ranks' batch-norm statistics are not
synchronised ends 0.04 away; at the digits recipe's lr 4.8 even a correct run ends 0.15 away, and no tolerance would
tell right from wrong.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_tensors
from slurm_helpers import (ROOT, TINY, cancelled_on_exit, env, launch, require_cluster, wait_for_lines, wait_job,
                           write_grid)

from clusterlab.rundir import read_status
from clusterlab.slurm.programs import to_argv

pytestmark = pytest.mark.slurm

TWO_NODE_PARTITION = os.environ.get("CLUSTERLAB_SLURM_TWO_NODE_PARTITION", "twonode")
CONFIG = "configs/swav_digits.yaml"
FLAGS = {**TINY, "nmb_prototypes": 10, "batch_size": 64, "epochs": 3, "lr": 0.01, "log_every": 1}
STEPS_PER_EPOCH = 14  # 898 training images, global batch 64
STEPS = 3 * STEPS_PER_EPOCH
# Logged steps before the interruption is sent: mid-run whatever the machine's speed, with 37 steps left for the
# signal to travel (the log's polling, scontrol or scancel, slurmctld, slurmd, the ranks).
STOP_AFTER = 5
ONE_PROCESS_TOLERANCE = 1e-3
RANK_LINE = re.compile(r"^rank (\d+)/(\d+) \(local (\d+)\) on (\S+) \(([^,]+), Slurm node (\d+)\): "
                       r"joining gloo at (\S+):(\d+)$", re.MULTILINE)


@pytest.fixture(scope="session")
def two_nodes():
    require_cluster(TWO_NODE_PARTITION)


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """Final checkpoints of the run on 2 processes on one node (torchrun) and on 1 process. Computed once per test
    session: pytest-xdist's workers share the folder, the first one computes under a lock."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's folder, above the per-worker ones
    folder = base / "two_node_references"
    argv = ["main_pretrain.py", "--config", CONFIG, *to_argv(FLAGS), "--seed", "0"]
    launchers = {"two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                 "one": [sys.executable]}
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name, launcher in launchers.items():
            run = folder / name
            if read_status(run).get("state") != "finished":  # an interrupted attempt resumes
                done = subprocess.run([*launcher, *argv, "--output_dir", str(run)], cwd=ROOT, env=env(),
                                      capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return {name: torch.load(folder / name / "checkpoint.pth", weights_only=True) for name in launchers}


def two_node_grid(tmp_path: Path) -> Path:
    """One run (swav_digits_s0) on 2 nodes x 1 task of the two-node partition."""
    return write_grid(tmp_path / "grid.yaml", name="two_nodes", program="main_pretrain.py", config=CONFIG,
                      axes={"seed": [0]}, flags=FLAGS,
                      resources={"nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1, "mem_gb": 1,
                                 "timeout_min": 10, "partition": TWO_NODE_PARTITION})


def interrupt_mid_run(job: str, run: Path, command: list[str]) -> None:
    """Run `command` once the job has logged STOP_AFTER steps, then wait until the job has left the queue (requeued,
    resumed and finished); a job left over by a failure is cancelled."""
    with cancelled_on_exit(job):
        wait_for_lines(run, STOP_AFTER, job_id=job)
        subprocess.run(command, check=True)
        wait_job(job)


def assert_ranks_on_two_nodes(output: str, starts: int) -> None:
    """Every start ran rank 0 and rank 1 on two different nodes, each on its own non-loopback address, with rank 1
    meeting rank 0 at rank 0's host name."""
    lines = RANK_LINE.findall(output)
    assert len(lines) == 2 * starts, output[-3000:]
    places = {}
    for rank, world, local, host, address, node, master, _port in lines:
        assert (world, local) == ("2", "0")
        places.setdefault(int(rank), set()).add((host, address, int(node), master))
    assert sorted(places) == [0, 1]
    assert all(len(seen) == 1 for seen in places.values()), places  # a requeued job came back on the same nodes
    (host0, address0, node0, master), = places[0]
    (host1, address1, node1, _), = places[1]
    assert (node0, node1) == (0, 1)
    assert host0 != host1 and address0 != address1, places
    assert not address0.startswith("127.") and not address1.startswith("127."), places
    assert master == host0


def assert_resumed_mid_run(output: str, signal_name: str) -> None:
    """The job saved on the signal at some step of the run and the requeued job went on from that same step."""
    saved = re.search(rf"^{signal_name}: saved \S+ at (the end of epoch (\d+)|epoch (\d+) step (\d+)/\d+);", output,
                      re.MULTILINE)
    assert saved, output[-3000:]
    where, ended, epoch, step = saved.groups()  # (counted from 1, as the progress lines count)
    done = int(ended) * STEPS_PER_EPOCH if ended else (int(epoch) - 1) * STEPS_PER_EPOCH + int(step)
    assert 0 < done < STEPS
    assert f"from {where} ->" in output, output[-3000:]


def assert_matches_references(run: Path, references: dict) -> None:
    ours = torch.load(run / "checkpoint.pth", weights_only=True)
    assert ours["global_step"] == STEPS
    # everything but the arguments (they name the output directory): weights, optimiser, random generators, ...
    assert_same_tensors({k: v for k, v in ours.items() if k != "args"},
                        {k: v for k, v in references["two"].items() if k != "args"}, "checkpoint")
    one = references["one"]["model"]
    worst = max((ours["model"][k].double() - one[k].double()).abs().max().item()
                for k in one if one[k].is_floating_point())
    assert worst < ONE_PROCESS_TOLERANCE, worst


def test_generated_sbatch_script_on_two_nodes_requeued_equals_reference(two_nodes, references, tmp_path):
    launch("--grid", str(two_node_grid(tmp_path)), "--output_root", str(tmp_path / "runs"), "--emit-sbatch",
           "--sbatch_dir", str(tmp_path / "sbatch"))
    script = tmp_path / "sbatch" / "swav_digits_s0.sh"
    assert "#SBATCH --nodes=2" in script.read_text() and "#SBATCH --ntasks-per-node=1" in script.read_text()
    run = tmp_path / "run"
    job = subprocess.run(["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={tmp_path}/%j.out", str(script)],
                         env=env(EXPERIMENT_PATH=str(run), PYTHON=sys.executable), capture_output=True, text=True,
                         check=True).stdout.strip()
    interrupt_mid_run(job, run, ["scontrol", "requeue", job])
    output = (tmp_path / f"{job}.out").read_text()
    assert read_status(run).get("state") == "finished", output[-3000:]
    # the trap's own requeue is not asked for (Slurm requeued the job already), nor taken for a failure or a cancel
    assert "the job is requeued already" in output and "scontrol requeue failed" not in output, output[-3000:]
    assert "the job is cancelled" not in output, output[-3000:]
    assert_ranks_on_two_nodes(output, starts=2)
    # the tasks' TERM from Slurm and the batch shell's USR2 race: the first to arrive names the save
    assert_resumed_mid_run(output, "SIG(?:TERM|USR2)")
    assert_matches_references(run, references)


def test_launch_grid_on_two_nodes_preempted_equals_reference(two_nodes, references, tmp_path):
    out = launch("--grid", str(two_node_grid(tmp_path)), "--output_root", str(tmp_path / "runs"))
    assert "2 node(s) x 1 task(s)" in out.stdout
    run = tmp_path / "runs" / "swav_digits_s0"
    job = json.loads((run / "slurm" / "jobs.jsonl").read_text().splitlines()[0])["job_id"]
    interrupt_mid_run(job, run, ["scancel", "--signal=USR2", job])
    logs = sorted((run / "slurm" / job).glob(f"{job}_*_log.out"))
    assert [p.name for p in logs] == [f"{job}_0_log.out", f"{job}_1_log.out"]  # one per task
    output = "\n".join(p.read_text() for p in logs)
    assert read_status(run).get("state") == "finished", output[-3000:]
    assert_ranks_on_two_nodes(output, starts=2)
    assert_resumed_mid_run(output, "SIGUSR2")
    assert_matches_references(run, references)
