"""The stop-signal handler (signals.py) in a process of its own: what reaches the handler that was there before ours."""
from __future__ import annotations

import signal
import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, TINY, script_env
from dist_utils import run_distributed

# A previous handler (submitit's requeues the job) during which a second stop signal arrives, as under Slurm a task
# gets TERM from slurmstepd and again from the batch shell's trap.
SECOND_SIGNAL_WHILE_LEAVING = """
import os, signal
calls = []
def previous(signum, frame):
    calls.append(signum)
    print(f"previous handler call {len(calls)}", flush=True)
    if len(calls) == 1:
        os.kill(os.getpid(), signal.SIGTERM)
signal.signal(signal.SIGUSR2, previous)
signal.signal(signal.SIGTERM, previous)
from clusterlab import signals
signals.install()
os.kill(os.getpid(), signal.SIGUSR2)
print("not reached")
"""


def test_a_second_signal_while_leaving_does_not_run_the_previous_handler_again():
    done = subprocess.run([PYTHON, "-c", SECOND_SIGNAL_WHILE_LEAVING], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 75, done.stderr
    assert done.stdout.splitlines() == ["previous handler call 1"]


# SIGTERM first, SIGUSR2 after, both while a training step runs: some clusters pre-empt that way, and only
# USR2's handler (submitit's) requeues. The first signal's handler alone ran (submitit's TERM handler only logs).
TERM_THEN_USR2 = """
import os, signal
def previous(signum, frame):
    print("previous handler of", signal.Signals(signum).name, flush=True)
signal.signal(signal.SIGUSR2, previous)
signal.signal(signal.SIGTERM, previous)
from clusterlab import signals
signals.install()
signals.defer()
os.kill(os.getpid(), signal.SIGTERM)
os.kill(os.getpid(), signal.SIGUSR2)
print("first received:", signal.Signals(signals.received()).name, flush=True)
signals.defer(False)
"""


def test_a_usr2_after_a_term_still_reaches_the_handler_that_requeues():
    done = subprocess.run([PYTHON, "-c", TERM_THEN_USR2], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 75, done.stderr
    assert done.stdout.splitlines() == ["first received: SIGTERM", "previous handler of SIGUSR2"]


# Rank 0 stops because another rank was signalled (the ranks agree on a stop): it received nothing itself, and
# submitit's handler exits with -1 after requeueing. status.json said "failed" although the run was saved.
STOPPED_FOR_ANOTHER_RANK = """
import json, signal, sys, types
def submitit_like(signum, frame):
    print("requeued on", signal.Signals(signum).name, flush=True)
    sys.exit(-1)
signal.signal(signal.SIGUSR2, submitit_like)
from clusterlab import distributed, engine, rundir, signals
signals.install()
run_dir = sys.argv[1]
try:
    with engine.owned_run_dir(run_dir, distributed.init("cpu")) as owned:
        rundir.write_status(run_dir, "interrupted", epoch=0, step=3)
        trainer = types.SimpleNamespace(finished=False, position=(0, 3), args=types.SimpleNamespace(epochs=2),
                                        run_dir=owned.run_dir)
        trainer.mark_interrupted = lambda: engine.Trainer.mark_interrupted(trainer)
        owned.trainer = trainer
        signals.leave()
finally:
    print(json.loads(open(run_dir + "/status.json").read())["state"], flush=True)
"""


def test_a_rank_stopped_for_another_ranks_signal_leaves_the_run_interrupted(tmp_path):
    done = subprocess.run([PYTHON, "-c", STOPPED_FOR_ANOTHER_RANK, str(tmp_path / "run")], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 255, done.stderr
    assert done.stdout.splitlines() == ["requeued on SIGUSR2", "interrupted"]


# A program run as its script runs it (programs.run), then what the stop signals do while the interpreter shuts down:
# atexit runs before Python gives them their default action back, which a second SIGTERM then took (status 143).
DISPOSITION_AT_EXIT = """
import atexit, os, signal, sys
from clusterlab import engine, programs
atexit.register(lambda: print("ignored at exit:", all(signal.getsignal(s) is signal.SIG_IGN
                                                          for s in (signal.SIGTERM, signal.SIGUSR2)), flush=True))
if sys.argv[1] == "signalled":  # a stop signal at the first step: saved, exit 75
    step = engine.Trainer.step
    def signalled(self, *args):
        os.kill(os.getpid(), signal.SIGUSR2)
        return step(self, *args)
    engine.Trainer.step = signalled
programs.run("main_pretrain.py", sys.argv[2:])
"""


@pytest.mark.parametrize("case, status", [("finished", 0), ("signalled", 75)])
def test_a_program_that_ended_or_left_for_the_requeue_ignores_further_stop_signals(tmp_path, case, status):
    done = subprocess.run([PYTHON, "-c", DISPOSITION_AT_EXIT, case, *TINY, "--epochs", "1", "--output_dir",
                           str(tmp_path / "run")], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == status, done.stderr
    assert done.stdout.splitlines()[-1] == "ignored at exit: True"


def _stopped_by_rank_one(rank, world_size):
    from clusterlab import engine, signals

    signals._received = signal.SIGUSR2 if rank == 1 else None
    engine.share_stop_signal(torch.device("cpu"))
    return signals.name()


def test_every_rank_names_the_stop_signal_one_rank_received():
    """Rank 0 writes status.json: for a SIGUSR2 that reached rank 1 only, it recorded "signal": "signal"."""
    assert run_distributed(_stopped_by_rank_one, 2) == ["SIGUSR2", "SIGUSR2"]
