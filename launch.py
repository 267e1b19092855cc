#!/usr/bin/env python
"""Launch a grid of runs on Slurm through submitit, or generate the sbatch scripts of the recipes.

    python launch.py --grid configs/grids/NAME.yaml [--dry-run] [--wait] [--cluster slurm|local]
    python launch.py --emit-sbatch [--recipes configs/recipes.yaml] [--sbatch_dir sbatch]
    python launch.py --grid configs/grids/NAME.yaml --emit-sbatch --sbatch_dir DIR   (one script per run)

Training runs are submitted as job arrays (one per resource shape, throttled by array_parallelism), one task per
GPU, with the rendezvous from submitit's TorchDistributedEnvironment; each run's evaluations follow as one job per
checkpoint epoch, started only if its training succeeds (afterok). Finished runs are skipped, unfinished ones
resume, evaluations already recorded are not repeated. On the pre-emption / time-limit signal a run saves a full
checkpoint and requeues itself (at most max_requeues times).
"""
from __future__ import annotations

import json
from pathlib import Path

from clusterlab import config, results, rundir
from clusterlab.errors import ConfigError, run_cli
from clusterlab.slurm.grid import Grid, RunSpec, load_grid
from clusterlab.slurm.jobs import ProgramJob, make_executor, wait_for
from clusterlab.slurm.programs import EVAL_PROGRAMS, to_argv
from clusterlab.slurm.sbatch import Stage, recipe_scripts, render, write_scripts


def get_args_parser():
    parser = config.new_parser(__doc__.splitlines()[0], prog="launch.py")
    parser.add_argument("--grid", default=None, help="grid file (configs/grids/*.yaml)")
    parser.add_argument("--output_root", default=None, help="where the runs go (default: the grid's, else runs/NAME)")
    parser.add_argument("--cluster", choices=["slurm", "local", "debug"], default="slurm",
                        help="submitit executor: Slurm, local processes, or in this process")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the plan, submit nothing")
    parser.add_argument("--wait", action="store_true", help="return only when every submitted job has left the queue")
    parser.add_argument("--emit-sbatch", "--emit_sbatch", dest="emit_sbatch", action="store_true",
                        help="write sbatch scripts instead of submitting")
    parser.add_argument("--recipes", default="configs/recipes.yaml", help="recipes for --emit-sbatch")
    parser.add_argument("--sbatch_dir", default="sbatch", help="where --emit-sbatch writes")
    return parser


def main(argv=None):
    args = config.parse(get_args_parser(), argv)
    if args.emit_sbatch:
        scripts = grid_scripts(load_grid(args.grid, args.output_root)) if args.grid else recipe_scripts(args.recipes)
        for path in write_scripts(scripts, args.sbatch_dir):
            print(path)
        return
    if not args.grid:
        raise ConfigError("give --grid FILE (or --emit-sbatch)")
    grid = load_grid(args.grid, args.output_root)
    plan = [(run, run_state(run, grid)) for run in grid.runs]
    print_plan(grid, plan)
    if args.dry_run:
        return
    job_ids = submit(grid, plan, args.cluster)
    if args.wait and args.cluster == "slurm":
        wait_for(job_ids)
        print("all jobs left the queue")
        for run, _ in plan:
            print(f"  {run.name}: {rundir.read_status(run.run_dir).get('state', 'no status')}")


def run_state(run: RunSpec, grid: Grid) -> str:
    """new, resume (a run directory without a finished status), finished, or queued (a job of it is queued)."""
    status = rundir.read_status(run.run_dir)
    if status.get("state") == "finished" and status.get("epochs") == run.flags.get("epochs", status.get("epochs")):
        return "finished"
    if queued_train_job(grid, run.name):
        return "queued"
    return "resume" if run.run_dir.exists() else "new"


def _queued_ids() -> set:
    import subprocess

    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
    return set(out.stdout.split()) if out.returncode == 0 else set()


def pending_evals(run: RunSpec) -> dict:
    """checkpoint -> [(program, argv)] of the evaluations with no record of that kind for that checkpoint yet."""
    grouped: dict = {}
    for spec in run.evals:
        if not results.has_record(run.run_dir, EVAL_PROGRAMS[spec.program], spec.checkpoint):
            grouped.setdefault(spec.checkpoint, []).append((spec.program, to_argv(spec.flags)))
    return grouped


def eval_summary(pending: dict) -> str:
    """`ep0200 ep0400 final (3 programs each)`: the evaluation jobs still to run."""
    if not pending:
        return "-"
    labels = [Path(ck).stem.replace("checkpoint_", "").replace("checkpoint", "final") for ck in pending]
    counts = sorted({len(v) for v in pending.values()})
    return f"{' '.join(labels)} ({'/'.join(map(str, counts))} program(s) each)"


def print_plan(grid: Grid, plan) -> None:
    axis_keys = list(plan[0][0].axis_values) if plan else []
    header = ["run", "state", *axis_keys, "evaluation jobs"]
    rows = [[run.name, state, *(str(run.axis_values[k]) for k in axis_keys),
             eval_summary(pending_evals(run))] for run, state in plan]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    resources = grid.resources
    programs = " then ".join(dict.fromkeys(run.program for run, _ in plan)) or "-"
    print(f"grid {grid.name}: {len(plan)} runs of {programs} "
          f"({resources['nodes']} node(s) x {resources['tasks_per_node']} task(s), "
          f"{resources['gpus_per_node']} GPU(s)/node, {resources['timeout_min']} min)")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))


def submit(grid: Grid, plan, cluster: str) -> list[str]:
    """Submit the training runs stage by stage (arrays where nothing is awaited, a job per run that waits for its
    previous stage) and the chained evaluation jobs; returns every job id."""
    folder = Path(grid.runs[0].run_dir).parent / ".submitit"
    states = {run.name: state for run, state in plan}
    ids, jobs = [], {}

    def parent_of(run: RunSpec):
        """The job a run must wait for: its previous stage's, submitted now or still queued from before."""
        if run.after is None:
            return None
        return jobs.get(run.after) or (queued_train_job(grid, run.after) if states[run.after] == "queued" else None)

    def send(runs: list[RunSpec], after=None) -> None:
        if not runs:
            return
        executor = make_executor(folder / "%j", grid.resources, cluster, f"{grid.name}-train",
                                 after=_job_id(after) if cluster == "slurm" else None)
        if after is not None and cluster != "slurm":
            after.result()  # the local executors know no dependencies: start after the awaited job returns
        with executor.batch():
            submitted = [executor.submit(ProgramJob([(run.program, run.argv())])) for run in runs]
        for run, job in zip(runs, submitted):
            jobs[run.name] = job
            record_job(run, job, "train")
            ids.append(str(job.job_id))

    stages = list(dict.fromkeys(run.stage for run, _ in plan))
    for stage in stages:
        to_train = [run for run, state in plan if run.stage == stage and state in ("new", "resume")]
        send([run for run in to_train if parent_of(run) is None])
        for run in to_train:
            if parent_of(run) is not None:
                send([run], after=parent_of(run))
    if ids:
        print(f"submitted {len(ids)} training job(s): {', '.join(ids)}")
    eval_count = 0
    for run, state in plan:
        if state == "queued" or not run.evals:
            continue
        parent = jobs.get(run.name)
        for checkpoint, commands in pending_evals(run).items():
            executor = make_executor(folder / "%j", grid.eval_resources, cluster, f"{grid.name}-eval",
                                     after=_job_id(parent) if parent is not None and cluster == "slurm" else None)
            if parent is not None and cluster != "slurm":
                parent.result()
            job = executor.submit(ProgramJob(commands))
            record_job(run, job, f"eval {checkpoint}")
            ids.append(str(job.job_id))
            eval_count += 1
    if eval_count:
        print(f"submitted {eval_count} evaluation job(s)")
    return ids


def _job_id(job) -> str | None:
    return None if job is None else str(getattr(job, "job_id", job))


def queued_train_job(grid: Grid, name: str) -> str | None:
    """The id of a run's training job that is still pending or running (from an earlier launch)."""
    path = Path(grid.runs[0].run_dir).parent / name / "slurm" / "jobs.jsonl"
    if not path.is_file():
        return None
    queued = _queued_ids()
    trains = [json.loads(line)["job_id"] for line in path.read_text().splitlines()
              if line.strip() and json.loads(line)["kind"] == "train"]
    return next((job for job in reversed(trains) if job in queued), None)


def record_job(run: RunSpec, job, kind: str) -> None:
    """RUN/slurm/jobs.jsonl lists every job that worked on the run; RUN/slurm/<id> links to its logs."""
    directory = run.run_dir / "slurm"
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "jobs.jsonl", "a") as handle:
        handle.write(json.dumps({"job_id": str(job.job_id), "kind": kind.split()[0], "what": kind,
                                 "logs": str(job.paths.folder), "submitted": rundir.now_iso()}) + "\n")
    link = directory / str(job.job_id)
    if not link.exists():
        link.symlink_to(Path(job.paths.folder).resolve(), target_is_directory=True)


def grid_scripts(grid: Grid) -> dict[str, str]:
    scripts = {}
    for run in grid.runs:
        flags = {k: v for k, v in run.flags.items() if k not in ("output_dir", "data_path")}
        evals = [(spec.program, {k: v for k, v in spec.flags.items() if k != "run"}) for spec in run.evals]
        scripts[run.name] = render(run.name, f"run {run.name} of grid {grid.name}", [Stage(None, run.program, flags)],
                                   evals, grid.resources, str(grid.path))
    return scripts


if __name__ == "__main__":
    run_cli(main)
