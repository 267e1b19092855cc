"""SIGKILL at any moment, checkpoint writes included, loses nothing and leaves nothing behind.

A run of 3 epochs with per-epoch checkpoints, then its kNN and k-means evaluations, is killed at least 10 times: at steps
drawn at random (fixed seed) and half-way through checkpoint, status and metrics writes (a wrapper makes the process
kill itself there: the product code has no test hook), and each time started again with the same command. At the
end every checkpoint equals the uninterrupted run's bit for bit, the metrics equal its metrics, every step is
logged once, and no temporary file or lock is left.
"""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest
import torch

from clusterlab import checkpoint, rundir
from conftest import ROOT, TINY, assert_ok, run_script, script_env
from dist_utils import free_port
from test_resume import assert_same_tensors

ARGS = [*TINY, "--epochs", "3", "--checkpoint_epochs", "1", "2", "3", "--log_every", "1", "--batch_size", "128"]
STEPS = 898 // 128
EVALS = [("eval_knn.py", ["--device", "cpu"]), ("eval_cluster.py", ["--device", "cpu", "--restarts", "2",
                                                                     "--plot", "false"])]
# Runs a program and SIGKILLs it: at (epoch, step) before that step, or half-way through the n-th atomic write
# (the temporary file holds half the bytes), or just before the n-th JSON-lines append (a log or metrics record).
KILLER = """
import os, signal, sys, tempfile
from clusterlab import checkpoint, engine, rundir
from clusterlab.programs import run
where, arg = sys.argv[1], sys.argv[2]
program, argv = sys.argv[3], sys.argv[4:]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if where == "step":
    epoch, step = map(int, arg.split(","))
    original_step = engine.Trainer.step
    def step_then_die(self, batch, progress):
        if (progress.epoch, progress.step) == (epoch, step):
            die()
        return original_step(self, batch, progress)
    engine.Trainer.step = step_then_die
elif where == "write":
    count = [int(arg)]
    original_write = checkpoint._atomic_write
    def write_half_then_die(path, data, *rest):
        count[0] -= 1
        if count[0] == 0:  # what a kill in the middle of the write leaves: half a temporary file
            fd, _ = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.write(fd, bytes(data)[: len(data) // 2])
            die()
        return original_write(path, data, *rest)
    checkpoint._atomic_write = write_half_then_die
elif where == "append":
    count = [int(arg)]
    original_append = rundir.append_jsonl
    def append_then_die(path, record, durable=False):
        count[0] -= 1
        if count[0] == 0:
            die()
        return original_append(path, record, durable)
    rundir.append_jsonl = append_then_die
sys.argv = [program]
run(program, argv)
"""


def killed(where: str, arg: str, program: str, argv: list) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, where, arg, program, *map(str, argv)], cwd=ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=180)


def evaluate(run_dir) -> None:
    for program, flags in EVALS:
        assert_ok(run_script(program, "--run", run_dir, "--skip_recorded", "true", *flags))


def metrics(run_dir) -> list:
    return [(r["eval"], r["checkpoint"], r["protocol"], r["metrics"]) for r in rundir.read_jsonl(run_dir /
                                                                                                "metrics.jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert_ok(run_script("main_pretrain.py", *ARGS, "--output_dir", run_dir))
    evaluate(run_dir)
    return run_dir


def test_kills_at_random_moments_lose_nothing_and_leave_nothing(tmp_path, reference):
    rng = random.Random(2026)
    run_dir = tmp_path / "run"
    argv = [*ARGS, "--output_dir", run_dir]
    kills = [("step", f"{rng.randrange(3)},{rng.randrange(STEPS)}") for _ in range(6)]
    kills += [("write", str(rng.randrange(1, 4))) for _ in range(5)]  # checkpoints and status.json
    kills += [("append", str(rng.randrange(1, 6)))]  # train_log.jsonl
    rng.shuffle(kills)
    outcomes = [killed(where, arg, "main_pretrain.py", argv).returncode for where, arg in kills]
    assert set(outcomes) <= {-9, 0}  # killed, or the moment drawn was already behind the resumed run: it finished
    assert_ok(run_script("main_pretrain.py", *argv))
    # Evaluations killed just before their record is written, then run again.
    for program, flags in EVALS:
        outcomes.append(killed("append", "1", program, ["--run", run_dir, "--skip_recorded", "true", *flags]).returncode)
    evaluate(run_dir)

    assert outcomes.count(-9) >= 10, outcomes
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.endswith(".png"))
    assert names == sorted(p.name for p in reference.iterdir() if not p.name.endswith(".png"))
    assert not [name for name in names if name.startswith(".")]  # no temporary file, no lock
    for name in ("checkpoint.pth", "checkpoint_ep0001.pth", "checkpoint_ep0002.pth", "checkpoint_ep0003.pth"):
        ours, theirs = checkpoint.load(run_dir / name), checkpoint.load(reference / name)
        for key in ("model", "optimizer", "method_state", "method_random", "rng", "epoch", "step", "global_step"):
            assert_same_tensors(ours[key], theirs[key], f"{name}/{key}")
    steps = [(r["epoch"], r["step"]) for r in rundir.read_jsonl(run_dir / "train_log.jsonl") if "step" in r]
    assert steps == [(e, s) for e in range(3) for s in range(STEPS)]
    assert metrics(run_dir) == metrics(reference)
    assert torch.equal(checkpoint.load(run_dir / "checkpoint.pth")["model"]["prototypes.weight"],
                       checkpoint.load(reference / "checkpoint.pth")["model"]["prototypes.weight"])


def test_a_rank_killed_mid_run_ends_the_others_with_one_line_and_keeps_the_checkpoint(tmp_path):
    """Rank 1 of two is killed in its second epoch (its node lost, the kernel's out-of-memory killer) while rank 0
    waits for it in that step's collectives. Rank 0 printed gloo's error under a 40-line traceback of its own
    (one per surviving rank, hiding the failing rank's); it now ends with one line naming what the backend saw, the
    same line in status.json, exit status 1, and the first epoch's checkpoint in place."""
    port = free_port()
    run_dir = tmp_path / "run"
    argv = [*map(str, ARGS), "--output_dir", str(run_dir)]
    group = {**script_env(), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    survivor = subprocess.Popen([sys.executable, str(ROOT / "main_pretrain.py"), *argv], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**group, "RANK": "0", "LOCAL_RANK": "0"})
    lost = subprocess.Popen([sys.executable, "-c", KILLER, "step", "1,2", "main_pretrain.py", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**group, "RANK": "1", "LOCAL_RANK": "1"})
    try:
        out, err = survivor.communicate(timeout=180)
        lost.wait(timeout=60)
    finally:
        survivor.kill()
        lost.kill()
    assert (survivor.returncode, lost.returncode) == (1, -9), (out, err)
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    message = line.removeprefix("main_pretrain.py: error: ")
    assert re.fullmatch(r"rank 0 of 2 lost another rank \(.*by peer.*\): that rank's log has the "
                        r"first failure", message), line
    status = json.loads((run_dir / "status.json").read_text())
    assert (status["state"], status["epoch"], status["reason"]) == ("failed", 1, message)
    assert checkpoint.load(run_dir / "checkpoint.pth")["epoch"] == 1
