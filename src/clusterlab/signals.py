"""Pre-emption and time-limit signals, caught from the first line of every program.

SIGUSR2 (submitit's signal, and the sbatch scripts' `--signal=B:USR2@120`), SIGUSR1 (the one other tools ask Slurm
for, `--signal=USR1@90`: taken as USR2) and SIGTERM (what `scontrol requeue` and pre-emption send) must end in a
requeue whatever the process is doing when they arrive. Python's default for each is to die at once, so the handler
is installed before anything heavy is imported (this module imports nothing but the standard library), and it has
two modes:

- leave (the default): nothing is worth saving yet (imports, data loading, model building, an evaluation): the
  previous handler runs (under submitit it requeues the job) and the process exits with status 75 (EX_TEMPFAIL, the
  exit status the sbatch scripts requeue on).
- defer (while a training loop runs): the signal is only remembered; the loop stops at the next step boundary (or,
  during an epoch's monitor or checkpoint, once they are done), saves a checkpoint, and then calls `leave()` itself.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys

EXIT_REQUEUE = 75
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGUSR1, signal.SIGTERM)
ASKING_FOR_A_REQUEUE = {signal.SIGUSR2, signal.SIGUSR1}  # (a TERM may come from a requeue Slurm has made already)

_previous: dict = {}
_received: int | None = None
_heard: int | None = None  # the stop signal another rank received (hear)
_seen: set = set()
_deferring = False
_leaving = False
_previous_unraisablehook = None


def install() -> None:
    """Catch the stop signals, and a requeue's exit Python would ignore (idempotent; the handlers found first are
    kept as the ones to hand over to)."""
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if current is not _handle:
            _previous[signum] = current
            signal.signal(signum, _handle)
    global _previous_unraisablehook
    if sys.unraisablehook is not _leave_where_python_ignores_the_exit:
        _previous_unraisablehook = sys.unraisablehook
        sys.unraisablehook = _leave_where_python_ignores_the_exit


def wrap_previous(signum: int, wrapper) -> None:
    """Hand `signum` over to wrapper(the previous handler) instead of the previous handler itself (after install)."""
    handler = _previous.get(signum)
    if callable(handler):
        _previous[signum] = wrapper(handler)


def previous(signum: int):
    """The handler `signum` is handed over to."""
    return _previous.get(signum)


def _handle(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signum
    _seen.add(signum)
    # A second signal while leaving (under Slurm a task often gets TERM from slurmstepd and again from the batch
    # shell's trap) must not run the previous handler (submitit's requeue) a second time, nor exit from inside it.
    if not _deferring and not _leaving:
        _leave_unsaved()


def _leave_unsaved() -> None:
    """Leave at a signal that came where nothing is deferred (a start, an evaluation), saying so: a job's log showed
    only srun's "exited with exit code 75". Written with os.write: the signal may have come in the middle of a
    print."""
    name = signal.Signals(_received or signal.SIGUSR2).name
    with contextlib.suppress(OSError):  # stderr closed or a broken pipe: the exit status is what matters
        os.write(2, f"{name}: stopped where no checkpoint is written (a start, or an evaluation, whose finished "
                    f"records are kept); exit status {EXIT_REQUEUE}: a requeued job or the same command again does "
                    f"the rest\n".encode())
    leave()


def _leave_where_python_ignores_the_exit(unraisable) -> None:
    """sys.unraisablehook: the requeue's SystemExit, raised by the handler inside code whose exceptions Python only
    reports (a weakref callback of importlib's module locks, a __del__), was printed as "Exception ignored in ..."
    with a traceback, and the program went on as if no signal had come (a job signalled while it imported trained a
    step before it left). It leaves at once there, with the exit's status: nothing is left behind that a killed
    process would not leave too (a run's lock is taken over as stale at the next start)."""
    if _leaving and issubclass(unraisable.exc_type, SystemExit):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        code = unraisable.exc_value.code
        os._exit(code if isinstance(code, int) else EXIT_REQUEUE)
    _previous_unraisablehook(unraisable)


def defer(enabled: bool = True) -> None:
    """While enabled, a stop signal is remembered instead of ending the process (see `received`)."""
    global _deferring
    _deferring = enabled
    if not enabled and _received is not None:
        leave()


def ignore() -> None:
    """For a process on its way out (its work done, or saved for the requeue): the stop signals are ignored from
    now on. Python gives them their default action back while it shuts down, and torch's teardown keeps the process
    a second or more, in which one (Slurm's second SIGTERM, from the batch shell's trap) killed it: status 143 or
    140 where the program had ended with 0 or 75."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def received() -> int | None:
    """The first stop signal this process got, if any."""
    return _received


def hear(signum: int) -> None:
    """Note the stop signal another rank received, which stopped this one too (this one received none)."""
    global _heard
    _heard = signum or None


def name() -> str:
    """The name of this process's stop signal, or of the one another rank received (`hear`)."""
    signum = _received or _heard
    return signal.Signals(signum).name if signum else "signal"


def leaving() -> bool:
    """Whether the process is on its way out through `leave` (a stop signal here or, agreed by all ranks, on
    another rank): whatever status the previous handler exits with, it is a requeue."""
    return _leaving


def leave() -> None:
    """Hand the signal to the handler that was there before ours (submitit's requeues the job), then exit 75.
    SIGUSR2 is the signal that asks for the requeue (submitit's handler for SIGTERM only logs): once it, or
    SIGUSR1, came, USR2's handler runs, even when a SIGTERM came first (some clusters pre-empt with TERM, then USR2);
    a stop this rank only heard of from another rank is handed over as SIGUSR2."""
    global _leaving
    _leaving = True
    signum = signal.SIGUSR2 if _seen & ASKING_FOR_A_REQUEUE or _received is None else _received
    handler = _previous.get(signum)
    # A second signal from here on reaches `_handle`, which does nothing while leaving; the signals are ignored
    # (against Python's shutdown) only once the program has unwound, by `programs.run`. Ignored here, a second signal
    # already waiting for its handler (TERM and USR2 together, during an import) met SIG_IGN: Python printed "Signal
    # 15 ignored due to race condition" with a traceback, and inside torch's C++ import the process aborted.
    if callable(handler):
        handler(signum, None)
    sys.exit(EXIT_REQUEUE)

