"""Launch a grid of runs on Slurm through submitit, or generate the sbatch scripts of the recipes.

    python launch.py --grid configs/grids/NAME.yaml [--dry-run] [--wait] [--cluster slurm|local|debug]
    python launch.py --emit-sbatch [--recipes configs/recipes.yaml] [--sbatch_dir sbatch]
    python launch.py --grid configs/grids/NAME.yaml --emit-sbatch --sbatch_dir DIR   (one script per run)

Training runs are submitted as job arrays (one per resource shape, throttled by array_parallelism), one task per
GPU, with the rendezvous from submitit's TorchDistributedEnvironment; each run's evaluations follow as one job per
checkpoint epoch, started only if its training succeeds (afterok). Finished runs are skipped (one trained with
other flags than the grid gives is named), unfinished ones resume (one whose last start failed is named with the
reason; one standing past the grid's epochs, whose training would be refused, is named and not submitted),
evaluations already recorded or still in the queue are not submitted again, unless the grid changed their flags
since the last one that succeeded (RUN/slurm/jobs.jsonl lists every job of a run; squeue says which are still
pending or running). `--wait` ends with status 1 where a run of the grid did not finish or an evaluation job it
waited for failed. On the pre-emption / time-limit signal a run saves a full checkpoint and requeues itself (at
most max_requeues times). `--cluster local` runs the jobs as
processes of this machine, `--cluster debug` inside this process (and so always waits for them); neither knows
afterok, so a job that must follow another is submitted once that one has returned, and not when it failed.

Relative `config:` paths of a grid or recipe file are read from the current directory, else beside the file or in
a folder above it (slurm/programs.py find_config), so launch.py works from any directory and from an installed
package (`clusterlab-launch`); the jobs run in the directory launch.py started in.
"""
from __future__ import annotations

import contextlib
import functools
import io
import re
import sys
from pathlib import Path

from submitit.core.utils import FailedJobError, FailedSubmissionError

from .. import checkpoint, config, results, rundir
from ..errors import ConfigError, UserError
from ..slurm.grid import Grid, RunSpec, load_grid
from ..slurm.jobs import (ProgramJob, make_executor, queued_ids, require_usr2_preemption, stuck, stuck_message,
                          wait_for)
from ..slurm.programs import EVAL_PROGRAMS, to_argv
from ..slurm.sbatch import Stage, recipe_scripts, render, write_scripts


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="launch.py")
    parser.add_argument("--grid", type=config.path, default=None, help="grid file (configs/grids/*.yaml)")
    parser.add_argument("--output_root", type=config.path, default=None,
                        help="where the runs go (default: the grid's, else runs/NAME)")
    parser.add_argument("--cluster", choices=["slurm", "local", "debug"], default="slurm",
                        help="submitit executor: Slurm, local processes, or in this process (debug always waits)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", type=config.bool_flag, nargs="?", const=True,
                        default=False,
                        help="print the plan, submit nothing")
    parser.add_argument("--wait", type=config.bool_flag, nargs="?", const=True, default=False,
                        help="return only when every job of the grid's runs has ended (those of an earlier launch "
                             "still queued too), then print each run's state")
    parser.add_argument("--emit-sbatch", "--emit_sbatch", dest="emit_sbatch", type=config.bool_flag, nargs="?",
                        const=True, default=False,
                        help="write sbatch scripts instead of submitting")
    parser.add_argument("--recipes", type=config.path, default="configs/recipes.yaml", help="recipes for --emit-sbatch")
    parser.add_argument("--sbatch_dir", type=config.path, default="sbatch", help="where --emit-sbatch writes")
    return parser


def main(argv=None):
    args = config.parse(get_args_parser(), argv)
    if args.emit_sbatch:
        scripts = (grid_scripts(load_grid(args.grid, args.output_root), args.sbatch_dir) if args.grid
                   else recipe_scripts(args.recipes, script_dir=args.sbatch_dir))
        for path in write_scripts(scripts, args.sbatch_dir, dry_run=args.dry_run):
            print(f"would write {path}" if args.dry_run else path)
        return
    if not args.grid:
        raise ConfigError("give --grid FILE (or --emit-sbatch)")
    grid = load_grid(args.grid, args.output_root)
    require_usr2_preemption()  # (a --dry-run refuses what the launch would)
    in_queue = set()
    if args.cluster == "slurm":
        in_queue = queued_ids()
        if in_queue is None:
            # Unknown: every unfinished run would look idle and be submitted a second time.
            unknown = "squeue did not answer, so the jobs already queued are unknown"
            if not args.dry_run:
                raise UserError(f"{unknown}; run launch.py again once the Slurm controller answers "
                                f"(or use --cluster local / debug)")
            print(f"warning: {unknown}; the plan below shows none as queued", file=sys.stderr)
            in_queue = set()
    plan = [(run, run_state(run, in_queue)) for run in grid.runs]
    print_plan(grid, plan, in_queue)
    if args.dry_run:
        return
    recorded_before = {run.name: len(recorded_jobs(run.run_dir)) for run, _ in plan}
    jobs = submit(grid, plan, args.cluster, in_queue)
    never = stuck([str(job.job_id) for job in jobs]) if args.cluster == "slurm" and jobs and not args.wait else {}
    if never:  # (--wait names them as it polls)
        print(f"warning: {stuck_message(never)}", file=sys.stderr)
    if args.wait or args.cluster == "debug":  # the debug executor runs a job only when its result is asked for
        # the jobs an earlier launch queued for these runs too: the states below are of the runs, not of this call
        earlier = [job["job_id"] for run, _ in plan for job in recorded_jobs(run.run_dir) if job["job_id"] in in_queue]
        wait_until_done(jobs, args.cluster, earlier)
        queue_now = (queued_ids() or set()) if args.cluster == "slurm" else set()
        failed_jobs = failed_job_ids(jobs, earlier, plan, args.cluster, queue_now)
        held = held_runs(plan)
        incomplete = []  # (for the exit status: `launch.py --wait && collect_results.py` tabulated a partial grid)
        for run, state in plan:
            # its jobs waited for: those this launch recorded, and those still queued from an earlier one (a debug
            # job's id, an address, and a local job's, a pid, may be an older record's too)
            waited = [job["job_id"] for index, job in enumerate(recorded_jobs(run.run_dir))
                      if index >= recorded_before[run.name] or job["job_id"] in earlier]
            if rundir.read_status(run.run_dir).get("state") != "finished" or set(waited) & failed_jobs:
                incomplete.append(run.name)
            if run.name in held:
                print(f"  {run.name}: not submitted ("
                      + {"held": "held by a process or job this launch does not know of)",
                         "ahead": "it stands past the grid's epochs)"}.get(state, "it starts from a run that is not "
                                                                                  "submitted)"))
                continue
            # (a local or debug job's failure is named as it returns; Slurm's are read back from their runs)
            failure = last_failure(run.run_dir) if args.cluster == "slurm" else None
            reached = rundir.read_status(run.run_dir).get("state") or ("no status.json: its job failed before "
                                                                       "training started, or never ran (cancelled, "
                                                                       "or a job it waited for failed)")
            print(f"  {run.name}: {reached}"
                  + (f" ({failure})" if failure else ""))
            if args.cluster == "slurm":
                for _, line in failed_evaluations(run.run_dir, queue_now):
                    print(f"  {run.name}: {line}")
        if incomplete:
            named = ", ".join(incomplete[:5]) + (f" and {len(incomplete) - 5} more" if len(incomplete) > 5 else "")
            print(f"launch.py: {len(incomplete)} of {len(plan)} runs did not finish, or an evaluation job of theirs "
                  f"failed ({named}): see the lines above", file=sys.stderr)
            sys.exit(1)


def failed_job_ids(jobs: list, earlier: list[str], plan, cluster: str, queue_now: set) -> set[str]:
    """The ids of the jobs waited for (`jobs` submitted now, `earlier` ones still queued then) that failed: a local
    or debug job that raised; a Slurm evaluation job that left the queue without its `done` line (a Slurm training
    job's run says how it ended in status.json)."""
    if cluster != "slurm":
        return {str(job.job_id) for job in jobs if not returned(job)}
    waited = {str(job.job_id) for job in jobs} | set(earlier)
    failed = set()
    for run, _ in plan:
        last = last_eval_jobs(run.run_dir)
        failed.update(last[key]["job_id"] for key in ended_unfinished(run.run_dir, queue_now))
    return failed & waited


def wait_until_done(jobs: list, cluster: str, earlier: list[str] = ()) -> None:
    """Return when every job has ended: Slurm's, those submitted now and the `earlier` ones still queued, have left
    the queue (squeue, so no accounting database is needed); a local or debug job that failed is named with the
    last line of its error."""
    if cluster == "slurm":
        wait_for([*earlier, *(str(job.job_id) for job in jobs)])
        print("all jobs left the queue")
        return
    for job in jobs:
        returned(job)
    print("all jobs ended")


SUBMITIT_RULE = "-" * 22  # around the job's traceback in the message of submitit's FailedJobError


@functools.cache  # asked again (by its next evaluation, by --wait), a job is waited for and reported once
def returned(job) -> bool:
    """Wait for a local or debug job; False, with its error's last line printed, when it failed. These executors
    know no dependencies: a job that must come after another is submitted only once that one has returned."""
    try:
        with _no_debugger_for_user_errors():
            job.result()
        return True
    except Exception as failure:  # submitit's FailedJobError (local), the job's own exception (debug)
        text = str(failure)
        if SUBMITIT_RULE in text:  # the job's traceback, between submitit's rules
            text = text.split(SUBMITIT_RULE)[1]
        lines = text.strip().splitlines() or [type(failure).__name__]
        print(f"job {job.job_id} failed: {lines[-1]} (logs: {job.paths.folder})")
        return False


@contextlib.contextmanager
def _no_debugger_for_user_errors():
    """submitit's debug executor opens pdb on any exception of a job (waiting for input at a terminal): a bad flag
    or a missing file, which the programs name on one line, is reported as a local job's is; a crash still opens
    the debugger."""
    import pdb

    post_mortem = pdb.post_mortem

    def unless_user_error(traceback=None):
        if not isinstance(sys.exc_info()[1], UserError):
            post_mortem(traceback)

    pdb.post_mortem = unless_user_error
    try:
        yield
    finally:
        pdb.post_mortem = post_mortem


def run_state(run: RunSpec, in_queue: set) -> str:
    """new, resume (a run directory without a finished status), finished (also one that trained more epochs than
    the grid gives now: its training would refuse to go back), queued (a job of it is queued), held (a process or
    job that this launch does not know of trains it: started by hand, by an sbatch script or by another grid) or
    ahead (unfinished, but its training would refuse the grid's epochs: stopped_past_end)."""
    status = rundir.read_status(run.run_dir)
    if status.get("state") == "finished" and (status.get("epochs") == run.epochs or epochs_beyond(run)):
        return "finished"
    if queued_train_job(run.run_dir, in_queue):
        return "queued"
    if rundir.in_use_by(run.run_dir) or queued_script_job(run.run_dir, in_queue):
        return "held"
    if stopped_past_end(run):
        return "ahead"
    return "resume" if run.run_dir.exists() else "new"


def epochs_beyond(run: RunSpec) -> int | None:
    """The epochs a finished run trained, where they are more than the grid gives it now (else None)."""
    status, asked = rundir.read_status(run.run_dir), run.epochs
    trained = status.get("epochs")
    if status.get("state") == "finished" and rundir.is_number(trained) and rundir.is_number(asked) and trained > asked:
        return trained
    return None


def stopped_past_end(run: RunSpec) -> str | None:
    """For an unfinished run whose training would refuse the grid's epochs (its checkpoint stands past them, or at
    the end of them while its schedule plans more): the line that says so. Submitted, its job was refused at every
    launch. Read from checkpoint.pth (memory-mapped: a few fields), as the training reads it: status.json keeps where
    a failed start stopped, and an epoch checkpoint copied over checkpoint.pth since goes on from its own epoch."""
    asked = run.epochs
    if rundir.read_status(run.run_dir).get("state") == "finished" or not rundir.is_number(asked):
        return None
    try:
        state = checkpoint.load(run.run_dir / "checkpoint.pth", mmap=True)
    except (UserError, OSError):
        return None  # (none yet, or unreadable: its training says why)
    epoch, step = state.get("epoch"), state.get("step", 0)
    planned = state["args"].get("epochs") if isinstance(state.get("args"), dict) else None
    if not (rundir.is_number(epoch) and rundir.is_number(step)):
        return None
    longer = rundir.is_number(planned) and planned > epoch
    if not (epoch > asked or (epoch == asked and (step > 0 or longer))):
        return None
    least = epoch + (step > 0 or longer)  # (as the training's refusal counts it: an epoch's end of a longer schedule
    # is refused as an end, the end of its own schedule taken as finished)
    return (f"{run.name}'s checkpoint.pth stands at {rundir.position_words(epoch, step)}"
            + (f" of the {planned} epochs its schedule plans" if rundir.is_number(planned) else "")
            + f", and the grid gives {asked}: its training would be refused, so it is not submitted, nor evaluated, "
              f"nor the stages after it; give it epochs {least} or more to go on, or another output_root trains "
              f"the grid's")


# Flags that change how a run trains or what it logs, not what it learns (collect_results' NOT_SETTINGS, less those
# that do: its seed, its data, the weights it starts from and the view SCAN mines on): a finished run with another
# value of one is no other recipe.
NOT_RECIPE_FLAGS = results.NOT_SETTINGS - {"seed", "data_path", "pretrained", "mining_crop"}


def differing_flags(run: RunSpec) -> list[str]:
    """`FLAG recorded -> asked` for each flag the grid or its config file gives the run that its config.yaml records
    otherwise (the run is not trained again: its directory holds what the recorded flags trained); flags of
    NOT_RECIPE_FLAGS are not compared."""
    try:
        recorded = config.read_run_config(run.run_dir)
    except ConfigError:
        return []

    def compared(key, value):  # a run records its --data_path absolute (runs before that, as given)
        return config.absolute_path(value) if key == "data_path" and isinstance(value, str) and value else value

    return [f"{key} {recorded[key]!r} -> {value!r}" for key, value in run.settings.items()
            if key not in NOT_RECIPE_FLAGS and key != "epochs" and key in recorded
            and compared(key, recorded[key]) != compared(key, value)]


def moved_start(run: RunSpec, runs_by_dir: dict) -> str | None:
    """For a finished run that started from another run of the grid (`pretrained_from`): a line where that run now
    trains other epochs than those its weights were taken after (the grid lengthened an earlier stage; the later
    ones are not trained again)."""
    source = runs_by_dir.get(str(run.flags.get("pretrained")))
    if source is None:
        return None
    origin = (config.written_run_config(run.run_dir) or {}).get("pretrained_from")
    taken = origin.get("epoch") if isinstance(origin, dict) else None
    # (a source that finished more epochs than the grid gives is not trained again: its weights stay)
    holds = epochs_beyond(source) or source.epochs
    if not rundir.is_number(taken) or not rundir.is_number(holds) or taken == holds:
        return None
    return (f"{run.name} finished from {source.name}'s weights after epoch {taken}, and the grid now trains "
            f"{source.name} {holds} epochs: {run.name} is not trained again from them (nor evaluated "
            f"again); another output_root trains the grid's")


def recorded_jobs(run_dir: Path) -> list[dict]:
    """RUN/slurm/jobs.jsonl, oldest first; a line cut short by a crash is skipped."""
    path = Path(run_dir) / "slurm" / "jobs.jsonl"
    if not path.is_file():
        return []
    return [job for job in rundir.read_jsonl(path) if "job_id" in job]


def queued_train_job(run_dir: Path, in_queue: set) -> str | None:
    """The id of a run's training job that is still pending or running (from an earlier launch)."""
    trains = [job["job_id"] for job in recorded_jobs(run_dir) if job.get("kind") == "train"]
    return next((job for job in reversed(trains) if job in in_queue), None)


def queued_script_job(run_dir: Path, in_queue: set) -> str | None:
    """The id of a Slurm job in the queue that an sbatch script started for this run (each start links its log as
    RUN/slurm/JOBID.out): pending again after a requeue, it holds no lock, and a second job for the run would
    meet the first's when that one starts again."""
    folder = Path(run_dir) / "slurm"
    started = sorted(path.name.removesuffix(".out") for path in folder.glob("*.out")) if folder.is_dir() else []
    return next((job for job in started if job in in_queue), None)


def queued_evals(run_dir: Path, in_queue: set) -> dict:
    """checkpoint -> programs of the evaluation jobs of an earlier launch that are still pending or running (an
    entry that does not list its programs covers every program of its checkpoint)."""
    queued: dict = {}
    for job in recorded_jobs(run_dir):
        if job.get("kind") == "eval" and job["job_id"] in in_queue:
            checkpoint = job.get("checkpoint") or str(job.get("what", "")).removeprefix("eval ")
            queued.setdefault(checkpoint, set()).update(job.get("programs") or EVAL_PROGRAMS)
    return queued


def evaluated_argv(run_dir: Path) -> dict:
    """(checkpoint, program) -> the command line of the last evaluation job of it that succeeded (its `done` line;
    jobs recorded before jobs kept their command lines: none)."""
    jobs = recorded_jobs(run_dir)
    done = {job["job_id"] for job in jobs if job.get("done")}
    argv = {}
    for job in jobs:
        if job["job_id"] in done:
            for program, words in (job.get("commands") or {}).items():
                argv[(job.get("checkpoint"), program)] = words
    return argv


def ended_unfinished(run_dir: Path, in_queue: set) -> set:
    """(checkpoint, program) whose last evaluation job ended without succeeding (no `done` line, no longer queued). It
    may have written some of its records (one K of several, CIFAR-100's class record without its superclass one),
    which would otherwise count as the evaluation made."""
    done = {job["job_id"] for job in recorded_jobs(run_dir) if job.get("done")}
    return {key for key, job in last_eval_jobs(run_dir).items() if job["job_id"] not in done | in_queue}


def last_eval_jobs(run_dir: Path) -> dict:
    """(checkpoint, program) -> the last evaluation job submitted for it (its jobs.jsonl entry)."""
    return {(job.get("checkpoint"), program): job for job in recorded_jobs(run_dir) if job.get("kind") == "eval"
            for program in job.get("programs") or ()}


def never_written(run: RunSpec) -> list[str]:
    """The epoch checkpoints the grid evaluates that the run finished without (its --checkpoint_epochs did not ask
    for them): an evaluation job of one fails, and would be submitted again at every launch."""
    if rundir.read_status(run.run_dir).get("state") != "finished":
        return []
    return list(dict.fromkeys(spec.checkpoint for spec in run.evals
                              if spec.epoch is not None and not (run.run_dir / spec.checkpoint).exists()))


def pending_evals(run: RunSpec, in_queue: set) -> dict:
    """checkpoint -> [(program, argv)] of the evaluations to submit: no job in the queue will make their record, and
    the run holds no record of that kind of the checkpoint at the epoch it is asked at (checkpoint.pth moves on as a
    run trains), or its last job ended without succeeding, or the grid now asks for it with other flags than the
    last job that succeeded (the program's --skip_recorded then runs only what is not recorded with the flags it is
    given)."""
    queued = queued_evals(run.run_dir, in_queue)
    last_argv = evaluated_argv(run.run_dir)
    unfinished = ended_unfinished(run.run_dir, in_queue)
    missing = never_written(run)
    beyond = epochs_beyond(run)
    grouped: dict = {}
    for spec in run.evals:
        if (spec.program in queued.get(spec.checkpoint, ()) or spec.checkpoint in missing
                or (beyond and spec.epoch is None)):  # its checkpoint.pth holds a later epoch than the grid's end
            continue
        argv = to_argv(spec.flags)
        recorded = results.has_record(run.run_dir, EVAL_PROGRAMS[spec.program], spec.checkpoint,
                                      position=(spec.weights_epoch, 0))
        if (not recorded or (spec.checkpoint, spec.program) in unfinished
                or last_argv.get((spec.checkpoint, spec.program), argv) != argv):
            grouped.setdefault(spec.checkpoint, []).append((spec.program, argv))
    return grouped


def _epoch_label(checkpoint: str) -> str:
    return Path(checkpoint).stem.replace("checkpoint_", "").replace("checkpoint", "final")


def eval_summary(pending: dict, queued: dict) -> str:
    """`ep0200 final (3 program(s) each); queued: ep0100`: the evaluation jobs to submit, and those still queued."""
    parts = []
    if pending:
        counts = sorted({len(v) for v in pending.values()})
        parts.append(f"{' '.join(map(_epoch_label, pending))} ({'/'.join(map(str, counts))} program(s) each)")
    if queued:
        parts.append(f"queued: {' '.join(map(_epoch_label, queued))}")
    return "; ".join(parts) or "-"


def print_plan(grid: Grid, plan, in_queue: set) -> None:
    axis_keys = list(plan[0][0].axis_values) if plan else []
    header = ["run", "state", *axis_keys, "evaluation jobs", "directory"]
    pending = {run.name: pending_evals(run, in_queue) for run, _ in plan}  # (it reads every run's records)
    rows = [[run.name, state, *(str(run.axis_values[k]) for k in axis_keys),
             eval_summary(pending[run.name], queued_evals(run.run_dir, in_queue)), str(run.run_dir)]
            for run, state in plan]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    runs_by_dir = {str(run.run_dir): run for run, _ in plan}
    resources = grid.resources
    programs = " then ".join(dict.fromkeys(run.program for run, _ in plan)) or "-"
    print(f"grid {grid.name}: {len(plan)} runs of {programs} ({resource_words(resources)})"
          + (f"; evaluation jobs: {resource_words(grid.eval_resources)}" if grid.eval_resources != resources else ""))
    print(f"runs go to {output_root(grid)}/ (one directory per run; submitit's job logs in .submitit/)")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    for run, state in plan:
        beyond = epochs_beyond(run) if state == "finished" else None
        if beyond:
            print(f"{run.name} finished {beyond} epochs, more than the {run.epochs} the grid gives now: it "
                  f"is not trained again, nor its final checkpoint evaluated as epoch {run.epochs}; another "
                  f"output_root trains the grid's")
        changed = differing_flags(run) if state == "finished" else []
        if changed:
            print(f"{run.name} finished with other flags than the grid gives now ({', '.join(changed)}): it is not "
                  f"trained again; another output_root trains the grid's")
        moved = moved_start(run, runs_by_dir) if state == "finished" else None
        if moved:
            print(moved)
        job = queued_script_job(run.run_dir, in_queue) if state == "held" else None
        holder = rundir.lock_holder(run.run_dir) if state == "held" and job is None else None
        if job:
            print(f"{run.name} is in use by Slurm job {job} of an sbatch script (in the queue; its log is linked as "
                  f"{str(run.run_dir / 'slurm' / f'{job}.out')!r}): not submitted, nor evaluated, nor the stages "
                  f"after it; launch again once it has ended")
        if holder:
            print(f"{run.name} is in use by {holder}: not submitted, nor evaluated, nor the stages after it; launch "
                  f"again once it has ended (a holder on another host that died without Slurm leaves its lock: "
                  f"remove {str(run.run_dir / rundir.LOCK_NAME)!r} then)")
        if state == "ahead":
            print(stopped_past_end(run))
        failure = last_failure(run.run_dir) if state == "resume" else None
        if failure:
            print(f"{run.name}: its last start failed ({failure}); it is submitted again")
        submitted = {(checkpoint, program) for checkpoint, commands in pending[run.name].items()
                     for program, _ in commands}
        for evaluations, line in failed_evaluations(run.run_dir, in_queue):
            again = ("submitted again" if evaluations & submitted
                     else "not submitted again (the plan does not ask for it)")
            print(f"{run.name}: {line}; it is {again}")
        missing = never_written(run)
        if missing:
            print(f"{run.name} finished without {', '.join(missing)} (its --checkpoint_epochs did not ask for them): "
                  f"not evaluated; another output_root trains the grid's")
    # A grid over epochs evaluates each run up to its end (the table shows where); only an epoch no run reaches is a
    # likely slip of the grid's author.
    reached = {spec.weights_epoch for run, _ in plan for spec in run.evals}
    unreached = sorted({epoch for run, _ in plan for epoch in run.epochs_past_end} - reached)
    if unreached:
        longest = max(run.epochs for run, _ in plan if run.evals or run.epochs_past_end)  # (a stage evaluated)
        print(f"evals.epochs {', '.join(map(str, unreached))}: past the end of every run evaluated (the longest "
              f"trains {longest} epochs): not evaluated")


def resource_words(resources: dict) -> str:
    """What a job of the grid asks Slurm for, as the plan's first line says it (what a --dry-run is for checking)."""
    words = [f"{resources['nodes']} node(s) x {resources['tasks_per_node']} task(s)",
             f"{resources['gpus_per_node']} GPU(s)/node", f"{resources['cpus_per_task']} CPU(s)/task",
             f"{resources['mem_gb']} GB/node", f"{resources['timeout_min']} min"]
    words += [f"{key} {resources[key]}" for key in ("partition", "constraint", "account", "qos") if resources[key]]
    return ", ".join(words)


# The line that ends a traceback: `clusterlab.errors.ConfigError: --queue_length 7 must be ...`, or a bare
# `AssertionError`
EXCEPTION_LINE = re.compile(r"(?:\w+\.)*(\w+(?:: .*)?)")


def final_exception(text: str) -> str | None:
    """The exception line of the last traceback in `text` that ended a process: not one Python printed while
    shutting down ("Exception ignored in: ..."), and not a line of the program's own output that looks like one."""
    lines, found, in_frames, ignored = text.splitlines(), None, False, False
    for index, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):"):
            before = next((earlier for earlier in reversed(lines[:index]) if earlier.strip()), "")
            in_frames, ignored = True, before.startswith("Exception ignored")
        elif in_frames and line and not line[0].isspace():
            in_frames = False
            match = EXCEPTION_LINE.fullmatch(line.strip())
            if match and not ignored:
                found = match.group(1)[:300]
    return found


def last_failure(run_dir: Path) -> str | None:
    """Why a run's last start failed, for a relaunch to say before it submits the run again: status.json's reason
    where the last training job wrote it, else (a job that failed before the run wrote a status: a flag found bad
    while the method was built, a resume refused) the exception its training job's log ends with."""
    status = rundir.read_status(run_dir)
    trains = [job for job in recorded_jobs(run_dir) if job.get("kind") == "train" and job.get("logs")]
    failed = (status.get("reason") or "no reason recorded") if status.get("state") == "failed" else None
    # (both UTC, as rundir.now_iso writes them: a status written since the last submission is that job's)
    if not trains or (status and str(status.get("updated", "")) >= str(trains[-1].get("submitted", ""))):
        return failed
    log = Path(trains[-1]["logs"]) / f"{trains[-1]['job_id']}_0_log.err"
    try:
        return final_exception(log.read_text(errors="replace")) or failed
    except OSError:
        return failed


def failed_evaluations(run_dir: Path, in_queue: set) -> list[tuple[set, str]]:
    """({(checkpoint, program)}, `the evaluation job 172 of checkpoint.pth (eval_cluster.py) ended without succeeding
    (ConfigError: ...)`) for each evaluation job that was the last of its checkpoint and programs and ended without
    succeeding (the reason: its log's last exception)."""
    last, failed = last_eval_jobs(run_dir), {}
    for checkpoint, program in sorted(ended_unfinished(run_dir, in_queue), key=str):
        job = last[(checkpoint, program)]
        failed.setdefault(job["job_id"], (job, []))[1].append(program)
    lines = []
    for job, programs in failed.values():
        try:
            log = (Path(job["logs"]) / f"{job['job_id']}_0_log.err").read_text(errors="replace")
            reason = final_exception(log) or "its log names no exception"
        except (OSError, KeyError):
            reason = "it left no log: it never started (a training job it waited for failed, or it was cancelled)"
        lines.append(({(job.get("checkpoint"), program) for program in programs},
                      f"the evaluation job {job['job_id']} of {job.get('checkpoint')} ({', '.join(programs)}) ended "
                      f"without succeeding ({reason})"))
    return lines


def output_root(grid: Grid) -> Path:
    return Path(grid.runs[0].run_dir).parent


@contextlib.contextmanager
def refused_by_sbatch(what: str, submitted: list):
    """sbatch's refusal (bad partition, account, ...) as one line naming what it refused and why, instead of
    submitit's traceback and the copy of sbatch's stderr it prints."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
    except (FailedJobError, FailedSubmissionError) as err:
        reason = "; ".join(line.strip().removeprefix("sbatch: error: ") for line in str(err).splitlines()
                           if line.strip())
        ids = ", ".join(str(job.job_id) for job in submitted)
        before = f" ({len(submitted)} job(s) submitted before it stay queued: {ids})" if submitted else ""
        raise ConfigError(f"sbatch refused {what}: {reason}{before}") from None
    sys.stderr.write(printed.getvalue())


def held_runs(plan) -> set[str]:
    """The runs a process or job this launch does not know of trains (`held`), those whose training would refuse the
    grid's epochs (`ahead`), and those of later stages that would start from them: none is submitted (the plan
    names them)."""
    held = {run.name for run, state in plan if state in ("held", "ahead")}
    for run, state in plan:  # (stage by stage: a run comes after the one it starts from)
        if run.after in held and state in ("new", "resume"):
            held.add(run.name)
    return held


def submit(grid: Grid, plan, cluster: str, in_queue: set) -> list:
    """Submit the training runs stage by stage (arrays where nothing is awaited, a job per run that waits for its
    previous stage) and the chained evaluation jobs; returns every job submitted."""
    folder = output_root(grid) / ".submitit"
    submitted, jobs = [], {}
    not_started = set()  # (local, debug) runs after a failed job of an earlier stage
    held = held_runs(plan)

    def previous_job(name: str):
        """A run's training job: submitted now, or still queued from an earlier launch."""
        return jobs.get(name) or queued_train_job(output_root(grid) / name, in_queue)

    def parent_of(run: RunSpec):
        """The job a run must wait for: its previous stage's."""
        return None if run.after is None else previous_job(run.after)

    def send(runs: list[RunSpec], after=None) -> None:
        if not runs:
            return
        executor = make_executor(folder / "%j", grid.resources, cluster, f"{grid.name}-train",
                                 after=_job_id(after) if cluster == "slurm" else None)
        if after is not None and cluster != "slurm" and not returned(after):
            print(f"{', '.join(run.name for run in runs)}: not started, nor evaluated (the job of its previous stage "
                  f"failed)")
            not_started.update(run.name for run in runs)
            return
        with refused_by_sbatch(f"the training job(s) of {', '.join(run.name for run in runs)}", submitted):
            with executor.batch():
                batch = [executor.submit(ProgramJob([(run.program, run.argv())])) for run in runs]
        for run, job in zip(runs, batch):
            jobs[run.name] = job
            record_job(run, job, "train")
            submitted.append(job)

    stages = list(dict.fromkeys(run.stage for run, _ in plan))
    for stage in stages:
        to_train = [run for run, state in plan if run.stage == stage and state in ("new", "resume")
                    and run.name not in held]
        after_failure = [run for run in to_train if run.after in not_started]
        if after_failure:  # the stage before was not started: this one waits for no job, and has nothing to read
            print(f"{', '.join(run.name for run in after_failure)}: not started, nor evaluated (an earlier stage's "
                  f"job failed)")
            not_started.update(run.name for run in after_failure)
        to_train = [run for run in to_train if run.name not in not_started]
        send([run for run in to_train if parent_of(run) is None])
        for run in to_train:
            if parent_of(run) is not None:
                send([run], after=parent_of(run))
    if submitted:
        print(f"submitted {len(submitted)} training job(s): {', '.join(str(job.job_id) for job in submitted)}")
    eval_count = 0
    for run, _ in plan:
        if run.name in not_started or run.name in held:
            continue
        parent = previous_job(run.name)
        for checkpoint, commands in pending_evals(run, in_queue).items():
            executor = make_executor(folder / "%j", grid.eval_resources, cluster, f"{grid.name}-eval",
                                     after=_job_id(parent) if parent is not None and cluster == "slurm" else None)
            if parent is not None and cluster != "slurm" and not returned(parent):
                continue
            with refused_by_sbatch(f"the evaluation job of {run.name} ({checkpoint})", submitted):
                job = executor.submit(ProgramJob(commands, done_log=str(run.run_dir / "slurm" / "jobs.jsonl")))
            record_job(run, job, f"eval {checkpoint}", checkpoint, commands)
            submitted.append(job)
            eval_count += 1
    if eval_count:
        print(f"submitted {eval_count} evaluation job(s)")
    return submitted


def _job_id(job) -> str | None:
    return None if job is None else str(getattr(job, "job_id", job))


def record_job(run: RunSpec, job, kind: str, checkpoint: str | None = None, commands: list | None = None) -> None:
    """RUN/slurm/jobs.jsonl lists every job that worked on the run (an evaluation job with its checkpoint, programs
    and their command lines); RUN/slurm/<id> links to its logs."""
    directory = run.run_dir / "slurm"
    directory.mkdir(parents=True, exist_ok=True)
    entry = {"job_id": str(job.job_id), "kind": kind.split()[0], "what": kind, "logs": str(job.paths.folder),
             "submitted": rundir.now_iso()}
    if checkpoint is not None:
        entry.update(checkpoint=checkpoint, programs=[program for program, _ in commands],
                     commands=dict(commands))
    # (a line a crash cut short is ended first: appended to it, this job's record was unreadable, and --wait did not
    # judge the run by it)
    rundir.append_jsonl(directory / "jobs.jsonl", entry)
    link = directory / str(job.job_id)
    if not link.exists():
        link.symlink_to(Path(job.paths.folder).resolve(), target_is_directory=True)


def grid_scripts(grid: Grid, script_dir: str) -> dict[str, str]:
    """One sbatch script per run, to be written into `script_dir`. Its EXPERIMENT_PATH defaults to the run's
    directory (absolute, under the grid's output_root, as --dry-run prints it and submit() uses it), so that a later
    stage's --pretrained, which names that directory, is where the earlier stage's script writes; its DATASET_PATH
    to the run's data_path, where the grid gives one."""
    scripts = {}
    for run in grid.runs:
        flags = {k: v for k, v in run.flags.items() if k not in ("output_dir", "data_path")}
        evals = [(spec.program, {k: v for k, v in spec.flags.items() if k not in ("run", "skip_recorded")})
                 for spec in run.evals]
        data_path = run.flags.get("data_path")
        stage = Stage(None, run.program, flags, reads_data_path=run.reads_data_path)
        scripts[run.name] = render(run.name, f"run {run.name} of grid {grid.name}", [stage],
                                   evals, grid.resources, str(grid.path), experiment_path=str(run.run_dir),
                                   dataset_path=None if data_path is None else str(data_path), script_dir=script_dir)
    return scripts

