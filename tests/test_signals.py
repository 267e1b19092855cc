"""The stop-signal handler (signals.py) in a process of its own: what reaches the handler that was there before ours."""
from __future__ import annotations

import subprocess

from conftest import PYTHON, ROOT, script_env

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
