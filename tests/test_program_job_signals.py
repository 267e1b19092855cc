"""Stop signals in the process submitit runs a launch.py job in (slurm/jobs.ProgramJob): from the moment the job is
unpickled (before submitit installs its own handlers) to the end of the process, after its programs."""
from __future__ import annotations

import os
import pickle
import subprocess
import tempfile

import pytest

from conftest import PYTHON, ROOT, script_env

# What submitit's job wrapper does (submission.process_job), with a fake program and fake submitit handlers: load the
# pickled job, install the handlers (TERM only logs, USR2 requeues and exits -1), call the job.
WRAPPER = """
import os, pickle, signal, sys, time, types
os.environ.update(SUBMITIT_FOLDER=".", SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="1", SUBMITIT_LOCAL_NTASKS="1",
                  SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_GLOBALID="0",
                  SUBMITIT_LOCAL_LOCALID="0")
from clusterlab.programs import PROGRAMS
from clusterlab.slurm.jobs import ProgramJob
PROGRAMS["fake.py"] = types.SimpleNamespace(main=lambda argv: print("program ran", flush=True))
data = pickle.dumps(ProgramJob([("fake.py", [])]))
job = pickle.loads(data)
WHEN = "{when}"
class TermWhileTheProcessEnds:
    def __del__(self):  # (Python gives the handlers their default action back before it deletes the modules' objects)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
if WHEN.startswith("start"):  # before submitit's handlers are there
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.2)
if WHEN == "start, then a TERM at the end":
    ending = TermWhileTheProcessEnds()
def bypass(signum, frame):
    print("submitit logs", signal.Signals(signum).name, flush=True)
def requeue(signum, frame):
    print("submitit requeues", flush=True)
    sys.exit(-1)
signal.signal(signal.SIGTERM, bypass)
signal.signal(signal.SIGUSR2, requeue)
job()
if WHEN == "end":  # the job's programs are done: a late TERM (scancel, a pre-emption) while the process ends
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)
print("exited normally", flush=True)
"""


def wrapper(when: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", WRAPPER.replace("{when}", when)], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)


# (a late TERM: Slurm's second one; before, the job that had left for the requeue was killed by it, status 143)
@pytest.mark.parametrize("when", ["start", "start, then a TERM at the end"])
def test_a_stop_signal_while_the_job_is_unpickled_is_handed_to_submitits_handler(when):
    done = wrapper(when)
    # before: killed by SIGUSR2 (-12), no requeue
    assert done.returncode == 255, (done.returncode, done.stderr[-2000:])
    assert done.stdout.splitlines() == ["submitit requeues"]


def test_a_job_whose_programs_ended_ignores_a_late_stop_signal():
    done = wrapper("end")
    # before: exit 75 ("submitit logs SIGTERM"): Slurm records the job FAILED and cancels the jobs waiting on it
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-2000:])
    assert done.stdout.splitlines() == ["program ran", "exited normally"]


def test_importing_the_job_module_imports_no_torch():
    """submitit unpickles the job, importing slurm/jobs.py, before any handler is installed: seconds of torch import
    there were seconds in which a stop signal killed the task."""
    done = subprocess.run([PYTHON, "-c", "import sys, clusterlab.slurm.jobs; print('torch' in sys.modules)"],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("requeued", [True, False])
def test_submitits_failed_requeue_of_a_job_slurm_requeued_already_is_a_requeue(monkeypatch, requeued):
    from clusterlab.slurm import jobs

    def handler(signum, frame):
        raise subprocess.CalledProcessError(1, ["scontrol", "requeue", "7"])

    monkeypatch.setattr(jobs, "_requeued_already", lambda: requeued)
    if requeued:
        with pytest.raises(SystemExit) as stop:
            jobs._requeue_unless_requeued(handler)(12, None)
        assert stop.value.code == 75
    else:
        with pytest.raises(subprocess.CalledProcessError):
            jobs._requeue_unless_requeued(handler)(12, None)


@pytest.mark.parametrize("state, restarts, expected", [
    ("RUNNING", "0", "requeue"),      # scancel -s TERM: the job goes on running unless it requeues
    ("COMPLETING", "1", "bypass"),    # scontrol requeue / pre-emption: Slurm requeues the job itself
    ("RUNNING", "1", "bypass"),       # requeued already, not yet stopped: requeued once
    ("CANCELLED", "0", "bypass"),     # scancel: the job is cancelled, not requeued
])
def test_a_term_while_slurm_keeps_the_job_running_requeues_it(monkeypatch, state, restarts, expected):
    from clusterlab.slurm import jobs

    calls = []
    monkeypatch.setattr(jobs, "_job_state", lambda: (state, restarts))
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    handler = jobs._term_requeues(lambda s, f: calls.append("bypass"), lambda s, f: calls.append("requeue"))
    handler(15, None)
    assert calls == [expected]


# `scontrol show job -o ID` as Slurm answers it: for an array's own id every task of the array still known, one line
# each (the task whose job id is the array's is in the middle here); for ARRAYID_TASK that task alone.
SCONTROL = """#!/bin/sh
case "$4" in
  36) echo "JobId=37 ArrayJobId=36 ArrayTaskId=1 JobState=COMPLETED Restarts=0"
      echo "JobId=36 ArrayJobId=36 ArrayTaskId=3 JobState=RUNNING Restarts=0"
      echo "JobId=38 ArrayJobId=36 ArrayTaskId=2 JobState=COMPLETED Restarts=2" ;;
  36_3) echo "JobId=36 ArrayJobId=36 ArrayTaskId=3 JobState=RUNNING Restarts=0" ;;
esac
"""


@pytest.mark.slow  # it runs a stand-in scontrol
def test_an_array_task_whose_id_is_the_arrays_reads_its_own_state(tmp_path, monkeypatch):
    """launch.py submits arrays; the task whose job id is the array's read the last task's line: another task's
    state (a TERM then only logged) and Restarts (a requeue that failed taken as done)."""
    from clusterlab.slurm import jobs

    fake = tmp_path / "scontrol"
    fake.write_text(SCONTROL)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "36")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "36")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert jobs._job_state() == ("RUNNING", "0")
    assert not jobs._requeued_already()


# submitit's own job process (submission.process_job) running a job whose program joined a process group (as
# distributed.init records it) and ends in each way it can; an exit handler registered before the job stands for the
# interpreter's finalisation.
JOB_IN_A_GROUP = """
import atexit, os, pickle, signal, sys, types
os.environ.update(SUBMITIT_EXECUTOR="local", SUBMITIT_LOCAL_JOB_ID="1", SUBMITIT_LOCAL_NTASKS="1",
                  SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_GLOBALID="0",
                  SUBMITIT_LOCAL_LOCALID="0")
atexit.register(lambda: print("finalised", file=sys.stderr, flush=True))
from submitit.core import submission, utils
from clusterlab import distributed
from clusterlab.programs import PROGRAMS
from clusterlab.slurm.jobs import ProgramJob
def main(argv):
    distributed._joined = True
    print("working", flush=True)
    if argv[0].startswith("crash"):
        raise RuntimeError("boom")
    if argv[0] == "requeue":
        sys.exit(75)
PROGRAMS["ending.py"] = types.SimpleNamespace(main=main)
case, folder = sys.argv[1:]
paths = utils.JobPaths(folder, job_id="1", task_id=0)
utils.DelayedSubmission(ProgramJob([("ending.py", [case])])).dump(paths.submitted_pickle)
if case == "crash-then-stop":  # a stop signal while submitit writes the error: after the programs, so ignored
    dump = utils.cloudpickle_dump
    def stopped_while_dumping(*args):
        os.kill(os.getpid(), signal.SIGUSR2)
        return dump(*args)
    utils.cloudpickle_dump = stopped_while_dumping
submission.process_job(folder)
"""


@pytest.mark.parametrize("case, status, result", [("ok", 0, ("success", ["ending.py"])), ("crash", 1, "error"),
                                                  ("crash-then-stop", 1, "error"), ("requeue", 75, None)])
def test_a_job_process_in_a_group_ends_without_finalising_once_submitit_wrote_its_result(tmp_path, case, status,
                                                                                         result):
    """The abort of a gloo worker during the interpreter's finalisation (programs.end_without_finalising) failed
    finished launch.py jobs too: submitit writes the result, then the process ends with the status the interpreter
    would give it (1 after the traceback, 75 for the requeue) and without its finalisation."""
    done = subprocess.run([PYTHON, "-c", JOB_IN_A_GROUP, case, str(tmp_path)], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=120)
    # before: every case printed "finalised" (the interpreter's exit handlers ran, then its finalisation)
    assert done.returncode == status and "finalised" not in done.stderr, (done.returncode, done.stderr[-2000:])
    assert "working" in done.stdout.splitlines()
    written = list(tmp_path.glob("*_result.pkl"))
    if result is None:
        assert written == []
    else:
        outcome = pickle.loads(written[0].read_bytes())
        assert outcome == result if case == "ok" else outcome[0] == result and "RuntimeError: boom" in outcome[1]
    if case.startswith("crash"):
        assert "RuntimeError: boom" in done.stderr


def test_a_job_process_outside_a_group_finalises():
    """A job of one process keeps the interpreter's exit handlers and finalisation."""
    with tempfile.TemporaryDirectory() as folder:
        done = subprocess.run([PYTHON, "-c", JOB_IN_A_GROUP.replace("distributed._joined = True", "pass"), "ok",
                               folder], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "finalised" in done.stderr, done.stderr[-2000:]
