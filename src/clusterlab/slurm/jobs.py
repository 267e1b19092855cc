"""What submitit runs: a light callable that holds only program names and command lines.

`ProgramJob` runs one or more entry scripts in order inside the job. All state lives in the run directory, so
`checkpoint()` (called by submitit on its pre-emption / time-limit signal) just returns a fresh copy of the same
job: the training loop has already saved checkpoint.pth at a step boundary when submitit gets control (our handler
runs first and hands over to submitit's, see signals.py), and the requeued job resumes from it. Evaluations already
recorded for a checkpoint are not run again, so a requeued evaluation job does not duplicate records; one that
succeeds says so in its run's slurm/jobs.jsonl (`done`).

Stop signals are caught from the moment submitit unpickles the job (before its own handlers exist) to the end of
the process, after the programs (then ignored, so a late one does not turn a finished job into a failed one). Two of
submitit's handlers are wrapped: its requeue on USR2 fails when Slurm has requeued the job already (Restarts is
ahead: a `scontrol requeue` or a pre-emption whose TERM came too), which is then a requeue (exit 75); and its TERM
handler only logs, so a TERM while Slurm keeps the job RUNNING (`scancel -s TERM`) requeues, as the sbatch scripts do.

A job process whose programs joined a process group ends before the interpreter's finalisation, after submitit has
written the job's result (an exit handler: see programs.end_without_finalising for the abort it avoids).
"""
from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

# Nothing heavy here: submitit's job wrapper unpickles ProgramJob (importing this module) before it installs its
# signal handlers, and until ProgramJob.__setstate__ has run a stop signal kills the task (no requeue).
from .. import signals
from . import job_id
from ..errors import ConfigError
from ..programs import PROGRAMS, crash_status, end_without_finalising


class ProgramJob:
    """Runs programs in order, in the directory the job was submitted from (relative paths mean what they meant
    there), from the installed package: nothing depends on where the repository is."""

    def __init__(self, commands: list[tuple[str, list[str]]], workdir: str | None = None,
                 done_log: str | None = None):
        """`done_log`: a jobs.jsonl that rank 0 tells, once every program has succeeded, that this job is done."""
        self.commands, self.workdir, self.done_log = commands, workdir or os.getcwd(), done_log

    def __setstate__(self, state: dict) -> None:
        """Unpickled in the job, before submitit installs its handlers: from here on a stop signal is remembered,
        and __call__ hands it to submitit's handler (which requeues) instead of the default action killing the task."""
        self.__dict__.update(state)
        # Only in submitit's job process (which sets SUBMITIT_FOLDER before it loads the job): not for a copy
        # unpickled anywhere else (a notebook reading a job's submission), nor under the debug executor, which calls
        # the job inside launch.py.
        self._in_job_process = "SUBMITIT_FOLDER" in os.environ
        if self._in_job_process:
            signals.install()
            signals.defer()

    def __call__(self) -> list[str]:
        if getattr(self, "_in_job_process", False):
            atexit.register(self._end_before_finalisation)
        signals.install()  # the handlers found now (submitit's) are the ones to hand over to
        signals.wrap_previous(signal.SIGUSR2, _requeue_unless_requeued)
        requeue = signals.previous(signal.SIGUSR2)
        signals.wrap_previous(signal.SIGTERM, lambda logs_only: _term_requeues(logs_only, requeue))
        try:
            try:
                signals.defer(False)  # a stop signal that came while the job started: leave for the requeue now
                # overwrite: a job inherits the submitting shell's environment, whose MASTER_PORT or WORLD_SIZE (a
                # torchrun session, an interactive allocation) are not this job's
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
                os.chdir(self.workdir)
                for program, argv in self.commands:
                    PROGRAMS[program].main(argv)
            finally:
                # As programs.run does: the work is done, failed, or left for the requeue (signals.leave ignores
                # nothing itself), so a late stop signal must neither requeue the job nor kill it (Python gives
                # handlers their default action back while it shuts down).
                if getattr(self, "_in_job_process", False):
                    signals.ignore()
        except SystemExit as leaving:  # the requeue (75, or submitit's -1), a one-line error (2)
            self._leaving_with = leaving.code
            raise
        from .. import rundir

        environment = submitit.JobEnvironment()
        if self.done_log and environment.global_rank == 0:
            rundir.append_jsonl(self.done_log, {"job_id": str(environment.job_id), "done": rundir.now_iso()})
        return [program for program, _ in self.commands]

    def _end_before_finalisation(self) -> None:
        """The first exit handler to run once submitit's process returns (its result written) or raises: ends a
        process that joined a process group with the status the interpreter would give it, before finalisation."""
        uncaught = getattr(sys, "last_value", None)  # what the interpreter printed as the process's traceback
        if uncaught is not None:
            end_without_finalising(crash_status(uncaught))
        code = getattr(self, "_leaving_with", None)
        end_without_finalising(code if code is None or isinstance(code, int) else 1)  # (the message is printed)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(ProgramJob(self.commands, self.workdir, self.done_log))


def _requeue_unless_requeued(handler):
    """submitit's USR2 handler, whose `scontrol requeue` fails when Slurm has requeued the job already (a
    `scontrol requeue` or a pre-emption from outside whose TERM came with or before the USR2): then the job is
    requeued, and the task leaves for it (exit 75) instead of failing with CalledProcessError."""
    def requeue(signum, frame):
        try:
            handler(signum, frame)
        except subprocess.CalledProcessError:
            if not _requeued_already():
                raise
            print("the job is requeued already (scontrol requeue, or a pre-emption, from outside)", flush=True)
            sys.exit(signals.EXIT_REQUEUE)
    return requeue


def _term_requeues(logs_only, requeue):
    """SIGTERM's handler for a task that leaves on it: submitit's only logs it, so a `scancel -s TERM` (or any TERM
    while Slurm keeps the job running) ended the job FAILED with status 75 and cancelled the jobs waiting on it. As the
    sbatch scripts do, the job requeues then; a TERM of Slurm's own requeue, pre-emption or cancel does not."""
    def handle(signum, frame):
        state, restarts = _job_state()
        if callable(requeue) and state == "RUNNING" and not _restarted(restarts):
            requeue(signal.SIGUSR2, frame)
        else:
            logs_only(signum, frame)
    return handle


def _job_state() -> tuple[str | None, str | None]:
    """This Slurm job's JobState and Restarts (None, None where scontrol cannot tell)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None, None
    try:
        # (short: a TERM of Slurm's own is followed by SIGKILL KillWait, 30 s by default, later)
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id()], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, None
    for line in out.stdout.splitlines():
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        if fields.get("JobId") == job:  # an array task's line names its own JobId
            return fields.get("JobState"), fields.get("Restarts")
    return None, None


def _restarted(restarts: str | None) -> bool:
    return bool(restarts and restarts.isdigit() and int(restarts) > int(os.environ.get("SLURM_RESTART_COUNT") or 0))


def _requeued_already() -> bool:
    """Whether Slurm has requeued this job since this start: its Restarts count is ahead of this start's."""
    return _restarted(_job_state()[1])


def require_usr2_preemption() -> None:
    """A ConfigError where SUBMITIT_PREEMPT_SIGNAL names another signal than USR2: submitit would put its requeue on
    it, which the programs hand to USR2's handler, found empty (the job saved and was not requeued); it reads the
    value as the name after "SIG", so SIGUSR2 or usr2 would make its jobs fail."""
    chosen = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    if chosen != "USR2":
        raise ConfigError(f"SUBMITIT_PREEMPT_SIGNAL={chosen}: the programs save on USR2 (and USR1, TERM) and "
                          f"requeue through submitit's USR2 handler; unset it or set it to USR2")


def make_executor(folder: Path, resources: dict, cluster: str, name: str, after: str | None = None
                  ) -> submitit.AutoExecutor:
    """An executor for `resources`; `after` (a Slurm job id) makes its jobs wait for that job to succeed."""
    require_usr2_preemption()
    executor = submitit.AutoExecutor(folder=str(folder), cluster=None if cluster == "slurm" else cluster,
                                     slurm_max_num_timeout=resources["max_requeues"])
    additional = {key: resources[key] for key in ("account", "qos") if resources.get(key)}
    if after is not None:
        additional.update({"dependency": f"afterok:{after}", "kill-on-invalid-dep": "yes"})
    params = dict(name=name, nodes=resources["nodes"], tasks_per_node=resources["tasks_per_node"],
                  cpus_per_task=resources["cpus_per_task"], mem_gb=resources["mem_gb"],
                  timeout_min=resources["timeout_min"])
    if resources["gpus_per_node"]:
        params["gpus_per_node"] = resources["gpus_per_node"]
    if cluster == "slurm":
        # Since Slurm 22.05 srun does not take --cpus-per-task from the job: its tasks could be bound to one CPU.
        params.update(slurm_signal_delay_s=resources["signal_delay_s"],
                      slurm_array_parallelism=resources["array_parallelism"],
                      slurm_additional_parameters=additional,
                      slurm_srun_args=["--cpus-per-task", str(resources["cpus_per_task"])])
        if resources.get("partition"):
            params["slurm_partition"] = resources["partition"]
        if resources.get("constraint"):
            params["slurm_constraint"] = resources["constraint"]
    executor.update_parameters(**params)
    return executor


# Why squeue says a job is pending, where it may never start: it asks for more nodes, GPUs or time than its
# partition has, a constraint no node meets, an account or QOS it may not use. Slurm accepts such jobs unless the
# cluster enforces partition limits at submission; some of these reasons also stand while nodes are down or drained,
# and clear when they come back, so they are reported, not acted on.
NEVER_STARTS = frozenset({"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints",
                          "InvalidAccount", "InvalidQOS"})


def queue_reasons() -> dict[str, str] | None:
    """Every pending or running Slurm job (array tasks as 123_4) with squeue's reason for its state ("None" for a
    running one), from squeue (no accounting database needed); None where squeue does not answer (no Slurm on this
    machine, or the controller is down)."""
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %r"], capture_output=True, text=True)
    except OSError:
        return None
    if out.returncode:
        return None
    return dict((line.split(maxsplit=1) + [""])[:2] for line in out.stdout.splitlines() if line.strip())


def queued_ids() -> set | None:
    """The ids of every pending or running Slurm job; None where squeue does not answer."""
    reasons = queue_reasons()
    return None if reasons is None else set(reasons)


def stuck(job_ids: list[str], reasons: dict[str, str] | None = None) -> dict[str, str]:
    """Those of `job_ids` that Slurm keeps pending for a reason of NEVER_STARTS, with it."""
    reasons = queue_reasons() if reasons is None else reasons
    return {job: reasons[job] for job in job_ids if (reasons or {}).get(job) in NEVER_STARTS}


def stuck_message(jobs: dict[str, str]) -> str:
    named = ", ".join(f"{job} ({reason})" for job, reason in jobs.items())
    return (f"Slurm keeps job(s) {named} pending for a reason that may never clear: they ask for more nodes, GPUs "
            f"or time than the partition has, a constraint, account or QOS it refuses, or the nodes they need are "
            f"down or drained; unless that is so, scancel them and change the grid's resources")


def wait_for(job_ids: list[str], poll_s: float = 2.0) -> None:
    """Block until none of the Slurm jobs is pending or running; a job that may never start is named (once)."""
    waiting, named = set(job_ids), set()
    while waiting:
        reasons = queue_reasons()
        if reasons is not None and not waiting & set(reasons):
            return
        never = {job: reason for job, reason in stuck(sorted(waiting), reasons or {}).items() if job not in named}
        if never:
            print(f"warning: {stuck_message(never)}", file=sys.stderr, flush=True)
            named |= set(never)
        time.sleep(poll_s)
