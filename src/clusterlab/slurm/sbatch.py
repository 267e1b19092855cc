"""Readable sbatch scripts generated from recipes (configs/recipes.yaml) or from the runs of a grid.

A script trains (resuming from $EXPERIMENT_PATH/checkpoint.pth if there is one), then evaluates the final checkpoint
in the same job, as the upstream CIFAR scripts chain their linear evaluation. Slurm's time-limit signal (USR2, sent
to the batch shell with `--signal=B:USR2`, whose trap passes it on to the running step) makes training save and exit
75; the script then requeues the job, and the next start resumes. EXPERIMENT_PATH (the run directory) defaults to
experiments/NAME for a recipe's script and to the run's directory (absolute, under the grid's output_root) for a
grid run's, so that a later stage's --pretrained names where the earlier stage's script writes. An --output_dir
among the script's arguments moves the whole run, evaluations included. The job's log goes to
experiments/logs/NAME_JOBID.out (the folder ships with the repository: Slurm does not create it), and
RUN/slurm/JOBID.out links to it.

Every value taken from a recipe or grid is shell-quoted, so no value can run a command; names (of scripts and
stages) are restricted to letters, digits and _.-, and comments to one line each.

Recipe file: a mapping of script names to recipes, and an optional `defaults:` recipe whose keys every recipe
starts from (its resources merged key by key):
    config: configs/x.yaml            # the program's --config, as the script runs it from the repository root;
                                      # checked here from the current directory, else beside this file or in a
                                      # folder above it (slurm/programs.py find_config)
    program: main_cluster.py          # optional: derived from the config's method
    flags: {epochs: 400}              # more flags
    epochs: [200, 400]                # optional: one script per value, the name holding `{epochs}`
    evals: [eval_linear.py, eval_knn.py, eval_cluster.py]
    eval_flags: {eval_linear.py: {epochs: 100}}
    resources: {gpus_per_node: 1, cpus_per_task: 2, mem_gb: 50, timeout_min: 720}
    description: one line for the header
    stages:                           # instead of config/program/flags: a pipeline run in one job, each stage in
      - {name: superand, config: configs/superand_cifar10.yaml}          # $EXPERIMENT_PATH/<name>
      - {name: embedul, config: configs/embedul_cifar10.yaml, pretrained_from: superand}
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from ..config import config_layers, load_yaml
from ..errors import ConfigError
from ..rundir import make_folder
from ..signals import EXIT_REQUEUE
from .grid import STAGE_KEYS, STAGE_NAME, STAGE_NAME_CHARACTERS, check_name, resolve_resources
from .programs import (EVAL_PROGRAMS, canonical_layers, check_eval_flags, find_config, reads_data_path, to_argv,
                       trained_method, training_program, validate_flags)

RECIPE_KEYS = {"config", "program", "flags", "stages", "epochs", "evals", "eval_flags", "resources", "description"}


def _time(minutes: int) -> str:
    return f"{minutes // 1440}-{minutes % 1440 // 60:02d}:{minutes % 60:02d}:00"


def _words(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def _quote(argv: list[str]) -> str:
    return " ".join(shlex.quote(token) for token in argv)


def _comment(text: str) -> str:
    """`text` on one line, so that nothing in it can end the comment it is written into."""
    return " ".join(str(text).split())


@dataclass
class Stage:
    """One training program of a script; several stages run in order, each in $EXPERIMENT_PATH/<name>."""

    name: str | None
    program: str
    flags: dict
    pretrained_from: str | None = None
    method: str | None = None  # of a recipe's stage: what its evaluations are checked against
    reads_data_path: bool = True  # digits read none


LOG_FOLDER = "experiments/logs"
# The extra arguments, less an --output_dir, which moves the whole run (EXPERIMENT_PATH) rather than training alone.
TAKE_OUTPUT_DIR = """args=()
while [ $# -gt 0 ]; do
  case $1 in
    --output_dir) EXPERIMENT_PATH=${2:?--output_dir needs a directory}; shift 2 ;;
    --output_dir=*) EXPERIMENT_PATH=${1#--output_dir=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done"""
# Stop signals at any moment end in a requeue, except a cancel. Slurm's time-limit signal goes to the batch shell
# (--signal=B:USR2, or B:USR1 as other tools ask for it), pre-emption and `scontrol requeue` send TERM. While a step
# runs, the signal is passed on to it as USR2, whichever came (srun forwards USR2 to the tasks; a TERM makes srun kill
# them outright): training saves at its next step boundary, anything else leaves at once, both exit 75. A step that ends
# its work with status 0 is not requeued for a late signal; the job requeues before starting the next step. `wait`
# returns early when a trap runs, so it is repeated until the step has really ended.
STOP_HANDLING = """stop=""
step_pid=""
on_signal() { stop=$1; if [ -n "$step_pid" ]; then kill -s USR2 "$step_pid" 2>/dev/null; fi; }
trap 'on_signal USR2' USR2
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM"""
STEP = """requeued_from_outside() {
  # a `scontrol requeue` or a pre-emption from outside (its TERM brought us here) requeued the job: Restarts is ahead
  local restarts
  restarts=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'Restarts=[0-9]*')
  if [ "${restarts#Restarts=}" -gt "${SLURM_RESTART_COUNT:-0}" ] 2>/dev/null; then
    echo "the job is requeued already (scontrol requeue, or a pre-emption, from outside)" >&2
    exit 0
  fi
}
requeue() {
  requeued_from_outside
  # A plain scancel sends TERM as a pre-emption does, and Slurm would requeue even a cancelled job: a job Slurm
  # shows CANCELLED, or COMPLETING for no reason (scancel; a time limit reads Reason=TimeLimit), is not requeued.
  local job state reason
  job=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null)
  state=$(grep -o 'JobState=[A-Z_]*' <<< "$job")
  reason=$(grep -o 'Reason=[^ ]*' <<< "$job" | head -n 1)
  if [ "$state" = JobState=CANCELLED ] || { [ "$state" = JobState=COMPLETING ] && [ "$reason" = Reason=None ]; }; then
    echo "the job is cancelled (${state#JobState=} with no reason given): not requeued" >&2
    exit %(requeue)d
  fi
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
    echo "stopped by ${stop:-a step} after $MAX_REQUEUES requeues (MAX_REQUEUES): not requeued again" >&2
    exit 1
  fi
  local refused
  if ! refused=$(scontrol requeue "$SLURM_JOB_ID" 2>&1); then
    requeued_from_outside
    # ending with 0 would read as done: jobs waiting on this one (afterok) would start on a half-trained run
    echo "scontrol requeue failed ($refused): not requeued; submit the same command again to resume" >&2
    exit %(requeue)d
  fi
  echo "stopped by ${stop:-exit status %(requeue)d}: requeued" \\
       "(restart $((${SLURM_RESTART_COUNT:-0} + 1)) of at most $MAX_REQUEUES)" >&2
  exit 0
}
step() {
  if [ -n "$stop" ]; then requeue; fi
  srun --unbuffered "$@" &
  step_pid=$!
  if [ -n "$stop" ]; then kill -s USR2 "$step_pid" 2>/dev/null; fi  # a signal that came before step_pid was set
  local status
  while :; do
    wait "$step_pid"
    status=$?
    kill -0 "$step_pid" 2>/dev/null || break
  done
  wait "$step_pid"  # the step's own status (a trap that interrupted the wait above left 128 + its signal)
  status=$?
  step_pid=""
  # a step that finished its work is done, whatever came meanwhile; one killed by the signal's TERM resumes
  if [ "$status" -eq %(requeue)d ] || { [ -n "$stop" ] && [ "$status" -ne 0 ]; }; then requeue; fi
  if [ "$status" -ne 0 ]; then exit "$status"; fi
}""" % {"requeue": EXIT_REQUEUE}
# Every word of an array that may be empty: under `set -u`, bash before 4.4 (RHEL 7's 4.2) calls "${a[@]}" of an
# empty array unbound and stops the script.
ALL_ARGS = '${args[@]+"${args[@]}"}'
ALL_EXTRA = '${extra[@]+"${extra[@]}"}'
# The job's log (the #SBATCH --output below, or sbatch's own --output), linked from the run directory.
LINK_LOG = """log=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *StdOut=//p')
if [ -n "$log" ]; then ln -sfn "$log" "$EXPERIMENT_PATH/slurm/$SLURM_JOB_ID.out"; fi"""


def _in_experiment(name: str | None) -> str:
    """The directory of a stage ($EXPERIMENT_PATH itself for a script of one stage)."""
    return '"$EXPERIMENT_PATH"' + (f"/{shlex.quote(name)}" if name else "")


def render(name: str, description: str, stages: list[Stage], evals: list[tuple[str, dict]], resources: dict,
           source: str, experiment_path: str | None = None, dataset_path: str | None = None,
           script_dir: str = "sbatch") -> str:
    """The text of one sbatch script (written into `script_dir`, which its usage line names); stage flags must not
    hold data_path or output_dir (the script sets them). EXPERIMENT_PATH defaults to `experiment_path` (a grid run's
    directory), else to experiments/NAME; DATASET_PATH to `dataset_path` (a grid's data_path), else to data."""
    check_name(name, "sbatch script name")
    staged = len(stages) > 1
    for stage in stages if staged else []:
        check_name(stage.name, f"{name}: stage name", STAGE_NAME, STAGE_NAME_CHARACTERS)
    tasks = resources["tasks_per_node"]
    directives = [f"--job-name={name}", f"--nodes={resources['nodes']}", f"--ntasks-per-node={tasks}"]
    if resources["gpus_per_node"]:
        directives.append(f"--gpus-per-node={resources['gpus_per_node']}")
    directives += [f"--cpus-per-task={resources['cpus_per_task']}", f"--mem={resources['mem_gb']}G",
                   f"--time={_time(resources['timeout_min'])}", f"--signal=B:USR2@{resources['signal_delay_s']}",
                   "--requeue", "--open-mode=append", f"--output={LOG_FOLDER}/%x_%j.out"]
    for key in ("partition", "constraint", "account", "qos"):
        if resources.get(key):
            directives.append(f"--{key}={resources[key]}")
    dataset_default = ("the grid's data_path" if dataset_path else "data") if any(
        stage.reads_data_path for stage in stages) else "not read: digits ship inside scikit-learn"
    stage_help = (f"; each stage also takes {', '.join(_stage_variable(s) for s in stages)}" if staged else "")
    lines = ["#!/bin/bash",
             _comment(f"# {name}: {description}" if description else f"# {name}"),
             _comment(f"# Generated by `python launch.py --emit-sbatch` from {source}: change that, not this file."),
             _comment(f"# Usage (from the repository root): sbatch {script_dir}/{name}.sh [more training flags]"),
             f"# Environment: DATASET_PATH ({dataset_default}), EXPERIMENT_PATH (run directory), PYTHON, and per "
             "evaluation",
             "# EVAL_KNN_ARGS / EVAL_CLUSTER_ARGS / EVAL_LINEAR_ARGS (extra flags, split on spaces)" + stage_help + ".",
             *([_comment(f"# EXPERIMENT_PATH defaults to this run's directory under the grid's output_root "
                         f"(where launch.py --grid puts it): {experiment_path}")]
               if experiment_path is not None else []),
             "# An --output_dir among the training flags replaces EXPERIMENT_PATH (evaluations follow the run).",
             f"# The job's log: {LOG_FOLDER}/{name}_JOBID.out, linked as $EXPERIMENT_PATH/slurm/JOBID.out.",
             *(f"#SBATCH {shlex.quote(d)}" for d in directives),
             STOP_HANDLING,
             "set -uo pipefail",
             f'DATASET_PATH=${{DATASET_PATH:-{shlex.quote(dataset_path or "data")}}}',
             f'EXPERIMENT_PATH=${{EXPERIMENT_PATH:-{shlex.quote(experiment_path or f"experiments/{name}")}}}',
             'PYTHON=${PYTHON:-python}',
             f'MAX_REQUEUES=${{MAX_REQUEUES:-{int(resources["max_requeues"])}}}',
             "# Since Slurm 22.05 srun does not take --cpus-per-task from the job: its tasks could be bound to one CPU.",
             'export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-1}}',
             TAKE_OUTPUT_DIR,
             'mkdir -p "$EXPERIMENT_PATH/slurm"',
             LINK_LOG,
             "",
             f"# A stopped step exits {EXIT_REQUEUE}: the job requeues itself (at most MAX_REQUEUES times), and the next",
             "# start resumes (training from its checkpoint; evaluations already recorded are skipped).",
             STEP]
    for stage in stages:
        output = _in_experiment(stage.name if staged else None)
        lines += ["", f"# Training{f' ({stage.name})' if staged else ''} resumes from {output.replace(chr(34), '')}"
                      "/checkpoint.pth when it exists."]
        extra = ALL_ARGS
        if staged:
            lines.append(f'read -ra extra <<< "${{{_stage_variable(stage)}:-}}"')
            extra = f"{ALL_ARGS} {ALL_EXTRA}"
        pretrained = f"--pretrained {_in_experiment(stage.pretrained_from)}" if stage.pretrained_from else ""
        lines += [_words('step "$PYTHON"', shlex.quote(stage.program), _quote(to_argv(stage.flags)), "\\"),
                  _words("   ", '--data_path "$DATASET_PATH"' if stage.reads_data_path else "", "--output_dir", output,
                         pretrained, extra)]
    final = _in_experiment(stages[-1].name if staged else None)
    if evals:
        lines += ["", "# Evaluations of the final checkpoint, in the same job."]
    for eval_program, eval_flags in evals:
        variable = f"EVAL_{Path(eval_program).stem.split('_', 1)[1].upper()}_ARGS"
        lines += [f'read -ra extra <<< "${{{variable}:-}}"',
                  _words('step "$PYTHON"', shlex.quote(eval_program), f"--run {final} --skip_recorded true",
                         _quote(to_argv(eval_flags)), ALL_EXTRA)]
    return "\n".join(lines) + "\n"


def _stage_variable(stage: Stage) -> str:
    return f"{stage.name.upper()}_ARGS"


def recipe_scripts(recipes_path: str | Path, root: Path | None = None, script_dir: str = "sbatch") -> dict[str, str]:
    """Script name -> text for every recipe (and every epoch value of a recipe that lists several), to be written
    into `script_dir` (their usage lines name it); the headers name the recipe file relative to `root` (default:
    the current directory) when it lies below it."""
    recipes_path = Path(recipes_path)
    recipes = load_yaml(recipes_path, "recipes", "configs/recipes.yaml")
    root = Path.cwd() if root is None else root
    source = str(recipes_path.relative_to(root)) if recipes_path.is_absolute() and \
        recipes_path.is_relative_to(root) else str(recipes_path)
    defaults = recipes.pop("defaults", None) or {}
    if not isinstance(defaults, dict) or set(defaults) - RECIPE_KEYS:
        raise ConfigError(f"{source}: `defaults` must be a mapping of recipe keys ({', '.join(sorted(RECIPE_KEYS))})")
    scripts = {}
    for key, recipe in recipes.items():
        if not isinstance(recipe, dict):
            raise ConfigError(f"{source}: recipe {key!r} must be a mapping")
        recipe = {**defaults, **recipe,
                  "resources": {**(defaults.get("resources") or {}), **(recipe.get("resources") or {})}}
        unknown = sorted(set(recipe) - RECIPE_KEYS)
        if unknown:
            raise ConfigError(f"{source}: recipe {key!r} has unknown key {unknown[0]!r} "
                              f"(valid: {', '.join(sorted(RECIPE_KEYS))})")
        given = recipe.get("epochs")
        if given is not None and not (isinstance(given, list) and given and all(
                isinstance(value, int) and not isinstance(value, bool) and value > 0 for value in given)):
            raise ConfigError(f"{source}: recipe {key!r}: epochs {recipe.get('epochs')!r} must be a list of positive "
                              f"whole numbers (one script per value), e.g. [200, 400]")
        epoch_values = given or [None]
        if len(epoch_values) > 1 and "{epochs}" not in str(key):
            raise ConfigError(f"{source}: recipe {key!r} lists {len(epoch_values)} epoch values, but its name has no "
                              f"{{epochs}} to tell their scripts apart (e.g. '{key}_{{epochs}}ep')")
        for epochs in epoch_values:
            name = check_name(str(key).replace("{epochs}", str(epochs)) if epochs is not None else str(key),
                              f"{source}: recipe name")
            label = f"{source}: recipe {name!r}"
            if name in scripts:
                raise ConfigError(f"{label}: two recipes write the script {name}.sh; give each its own name")
            stage_specs = recipe.get("stages") or [{k: recipe[k] for k in STAGE_KEYS if k in recipe}]
            stages = [_stage(spec, epochs, label, recipes_path) for spec in stage_specs]
            named = [stage.name for stage in stages]
            for stage in stages:
                if stage.pretrained_from is not None and stage.pretrained_from not in named[:named.index(stage.name)]:
                    raise ConfigError(f"{label}: stage {stage.name!r} takes pretrained_from "
                                      f"{stage.pretrained_from!r}, which is not an earlier stage")
            evals = []
            for eval_program in recipe.get("evals") or []:
                if eval_program not in EVAL_PROGRAMS:
                    raise ConfigError(f"{label}: eval {eval_program!r} is not one of {', '.join(EVAL_PROGRAMS)}")
                eval_flags = (recipe.get("eval_flags") or {}).get(eval_program, {})
                check_eval_flags(eval_program, eval_flags, stages[-1].method, label)  # validates them too
                evals.append((eval_program, eval_flags))
            resources = resolve_resources(recipes_path, recipe.get("resources"), f"recipe {name!r} resources",
                                          "recipes file")
            scripts[name] = render(name, recipe.get("description", ""), stages, evals, resources, source,
                                   script_dir=str(script_dir))
    return scripts


def _stage(spec: dict, epochs, label: str, recipes_path: Path) -> Stage:
    if not isinstance(spec, dict) or "config" not in spec:
        raise ConfigError(f"{label}: each stage needs a `config`")
    unknown = sorted(set(spec) - STAGE_KEYS)
    if unknown:
        raise ConfigError(f"{label}: stage has unknown key {unknown[0]!r} (valid: {', '.join(sorted(STAGE_KEYS))})")
    flags = {"config": spec["config"], **(spec.get("flags") or {})}
    if epochs is not None:
        flags["epochs"] = epochs
    for forbidden in ("data_path", "output_dir", "pretrained"):
        if forbidden in flags:
            raise ConfigError(f"{label} sets {forbidden!r}; the script sets it (DATASET_PATH, EXPERIMENT_PATH, "
                              f"pretrained_from)")
    layers = [*config_layers(find_config(spec["config"], recipes_path, label)),
              (label, {k: v for k, v in flags.items() if k != "config"})]
    program = training_program({k: v for _, layer in layers for k, v in layer.items()}, spec.get("program"), label)
    merged = {k: v for layer in canonical_layers(program, layers) for k, v in layer.items()}
    validate_flags(program, merged, label)
    return Stage(spec.get("name"), program, flags, spec.get("pretrained_from"), trained_method(program, merged),
                 reads_data_path(program, merged))


def write_scripts(scripts: dict[str, str], directory: str | Path, dry_run: bool = False) -> list[Path]:
    """DIRECTORY/NAME.sh for every script, executable; `dry_run`: only the paths they would be written to."""
    directory = Path(directory)
    if not dry_run:
        make_folder(directory, "sbatch folder", "choose another --sbatch_dir")
    written = []
    for name, text in sorted(scripts.items()):
        path = directory / f"{name}.sh"
        if not dry_run:
            path.write_text(text)
            path.chmod(0o755)
        written.append(path)
    return written
