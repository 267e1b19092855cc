"""Grid files: a cartesian product of flag values, expanded into named runs and the evaluations chained to them.

    name: digits_smoke                 # the grid's name; runs go to runs/<name>/<run> unless output_root says
    program: main_pretrain.py          # optional: the program that trains the runs' method (main_cluster.py for
                                       # SeLa, Self-Classifier, EmbedUL, SCAN, SCAN's self-labelling, else
                                       # main_pretrain.py)
    config: configs/swav_digits.yaml   # optional base YAML (the program's --config); may also be an axis;
                                       # a relative path: from the current directory, else beside this file or
                                       # in a folder above it (slurm/programs.py find_config)
    axes:                              # every combination becomes one run; any flag of the program may be an axis
      method: [swav]
      epochs: [2, 4]
      seed: [0, 1]
    flags: {width: 4}                  # set for every run
    stages:                            # instead of program/config: a pipeline, each stage a run chained afterok
      - {name: superand, config: configs/superand_cifar10.yaml, flags: {rounds: 5}}
      - {name: embedul, config: configs/embedul_cifar10.yaml, pretrained_from: superand}
    evals:                             # chained after each (last-stage) run (afterok), one job per checkpoint epoch
      programs: [eval_knn.py, eval_cluster.py]
      flags: {eval_cluster.py: {clusters: [10, 20]}}
      epochs: [2]                      # checkpoint_epNNNN of these epochs; `final` (default) = checkpoint.pth
    resources: {gpus_per_node: 1, cpus_per_task: 2, mem_gb: 8, timeout_min: 60}
    eval_resources: {timeout_min: 30}  # keys not given: as in resources, but nodes and tasks_per_node (defaults);
                                       # without eval_resources: all of resources

Everything is checked before anything is submitted (so --dry-run refuses it too): unknown keys, empty axes (and an
empty evals.epochs, or one without evals.programs), flags
the program does not have, values of the wrong type, drops without a step schedule, resources Slurm cannot take
(negative memory, zero nodes) and names that could not be a file name or a shell word all fail with a message that
names the key. What needs the data or the model (a split the dataset lacks, crops the architecture cannot take,
flags that do not go together) is checked by the program when each job starts, before it writes anything.
"""
from __future__ import annotations

import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import config_layers, load_yaml, replaced_alternatives
from ..errors import ConfigError
from .programs import (EVAL_PROGRAMS, TRAINING_PROGRAMS, canonical_layers, check_eval_flags, find_config,
                       program_parser, reads_data_path, to_argv, trained_method, training_program, validate_flags)

GRID_KEYS = {"name", "program", "config", "stages", "axes", "flags", "evals", "resources", "eval_resources",
             "output_root"}
STAGE_KEYS = {"name", "program", "config", "flags", "pretrained_from"}
EVAL_KEYS = {"programs", "flags", "epochs"}
RESOURCE_DEFAULTS = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 0, "cpus_per_task": 2, "mem_gb": 8,
                     "timeout_min": 60, "partition": None, "signal_delay_s": 120, "max_requeues": 30,
                     "array_parallelism": 16, "constraint": None, "account": None, "qos": None}
# The smallest value of each numeric resource (0 tasks per node: one per GPU, at least one).
RESOURCE_MINIMUM = {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 0, "cpus_per_task": 1, "mem_gb": 1,
                    "timeout_min": 1, "signal_delay_s": 0, "max_requeues": 0, "array_parallelism": 1}
# What a partition, constraint, account or qos may hold: Slurm's names and constraint operators, nothing a shell or
# a generated #SBATCH line would read as more than one word.
SLURM_WORD = re.compile(r"[A-Za-z0-9_.,:&|!*()\[\]-]+")
# Script, grid and run names become file names, Slurm job names and shell words.
NAME_CHARACTERS = "letters, digits and _.- (starting with a letter or digit)"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# A stage name also names a shell variable (STAGE_ARGS) in generated scripts.
STAGE_NAME_CHARACTERS = "letters, digits and _ (starting with a letter)"
STAGE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
# Short names for the usual axes, so that run names stay readable: swav_digits_100ep_s0.
NAME_PARTS = {"epochs": "{}ep", "seed": "s{}"}


@dataclass
class EvalSpec:
    program: str
    flags: dict
    checkpoint: str      # checkpoint.pth or checkpoint_epNNNN.pth
    epoch: int | None    # None: the final checkpoint
    weights_epoch: int   # the epoch its checkpoint holds once written: `epoch`, or the run's epochs for the final one


@dataclass
class RunSpec:
    name: str
    program: str
    flags: dict                        # every flag this run passes, --config and --output_dir included
    axis_values: dict
    settings: dict = field(default_factory=dict)  # what it trains with: its config file's values and the grid's
    epochs: int = 0                    # the epochs it trains (those values', else the program's default)
    evals: list = field(default_factory=list)
    stage: str | None = None           # the pipeline stage it belongs to
    after: str | None = None           # the run (of the previous stage) it starts after
    epochs_past_end: list = field(default_factory=list)  # evals.epochs past its end: not evaluated there
    reads_data_path: bool = True       # digits read none (an sbatch script of the run passes none)

    @property
    def run_dir(self) -> Path:
        return Path(self.flags["output_dir"])

    def argv(self) -> list[str]:
        return to_argv(self.flags)


@dataclass
class Grid:
    name: str
    path: Path
    runs: list
    resources: dict
    eval_resources: dict


def _fail(path, message: str, kind: str = "grid"):
    raise ConfigError(f"{kind} {str(path)!r}: {message}")


def check_name(name, label: str, pattern: re.Pattern = SAFE_NAME, allowed: str = NAME_CHARACTERS) -> str:
    """`name` if it matches `pattern`, else a ConfigError naming it and the characters allowed."""
    if not isinstance(name, str) or not pattern.fullmatch(name):
        raise ConfigError(f"{label} {name!r} may hold only {allowed}")
    return name


def run_name(values: dict, axis_keys: list[str], stage: str | None = None) -> str:
    """method_dataset (a pipeline's stage name, or the config file's name when `config` is an axis), then every
    other axis: `swav_digits_100ep_s0`, `..._lr0.6`, `unmix_cifar10_queue_400ep`, `embedul_s0`; characters other
    than letters, digits and _.- become -, and the name starts and ends with a letter or digit."""
    if stage:
        parts = [stage]
    elif "config" in axis_keys:
        parts = [Path(str(values["config"])).stem]
    else:
        parts = [str(values[k]) for k in ("method", "dataset") if k in values]
    for key in axis_keys:
        if key in ("method", "dataset", "config"):
            continue
        value = values[key]
        text = "-".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
        parts.append(NAME_PARTS[key].format(text) if key in NAME_PARTS else f"{key}{text}")
    name = "_".join(parts) or "run"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:200].strip("-._") or "run"


def resolve_resources(path, given: dict | None, label: str, kind: str = "grid") -> dict:
    given = given or {}
    if not isinstance(given, dict):
        _fail(path, f"{label} must be a mapping", kind)
    unknown = sorted(set(given) - set(RESOURCE_DEFAULTS))
    if unknown:
        _fail(path, f"unknown key {label}.{unknown[0]!r} (valid: {', '.join(RESOURCE_DEFAULTS)})", kind)
    resources = {**RESOURCE_DEFAULTS, **given}
    for key, value in given.items():
        if key in RESOURCE_MINIMUM:
            if isinstance(value, bool) or not isinstance(value, int) or value < RESOURCE_MINIMUM[key]:
                _fail(path, f"{label}.{key} = {value!r} must be an integer >= {RESOURCE_MINIMUM[key]}", kind)
        elif value is not None and not (isinstance(value, str) and SLURM_WORD.fullmatch(value)):
            _fail(path, f"{label}.{key} = {value!r} must be a Slurm name (letters, digits and _.,:&|!*()[]-)", kind)
    if resources["signal_delay_s"] >= 60 * resources["timeout_min"]:
        # Slurm would send the time-limit signal as soon as the job starts: every start would save and requeue at
        # once, until the requeues run out.
        _fail(path, f"{label}.signal_delay_s = {resources['signal_delay_s']} must be below {label}.timeout_min x 60 = "
                    f"{60 * resources['timeout_min']} s (the time-limit signal comes signal_delay_s before the "
                    f"limit)", kind)
    tasks, gpus = resources["tasks_per_node"], resources["gpus_per_node"]
    if tasks == 0:
        resources["tasks_per_node"] = max(1, gpus)
    elif gpus and tasks != gpus:
        # Each process trains on one GPU of its node: more tasks would share a GPU (NCCL refuses), fewer leave some
        # idle.
        _fail(path, f"{label}.tasks_per_node = {tasks} with {label}.gpus_per_node = {gpus}: each task uses one GPU, "
                    f"so give tasks_per_node: {gpus} or leave it out", kind)
    return resources


def load_grid(path: str | Path, output_root: str | Path | None = None) -> Grid:
    path = Path(path)
    spec = load_yaml(path, "grid", "configs/grids/digits_smoke.yaml")
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        _fail(path, f"unknown key {unknown[0]!r} (valid: {', '.join(sorted(GRID_KEYS))})")
    name = check_name(str(spec.get("name") or path.stem), f"grid {str(path)!r}: name")
    stages = _stages(path, spec)
    axes, flags = _axes_and_flags(path, spec, stages)
    # Absolute, so that this process, its jobs and a generated sbatch script (run from wherever sbatch is called)
    # mean the same directories.
    if not isinstance(spec.get("output_root") or "", str):
        _fail(path, f"`output_root` must be a folder's path (got {spec['output_root']!r})")
    root = Path(output_root or spec.get("output_root") or Path("runs") / name).absolute()
    # before the plan: a dry run passed, and the submission failed once it came to make the first run's folder
    blocker = next(folder for folder in (root, *root.parents) if os.path.lexists(folder))
    if not blocker.is_dir():
        what = "a link to nowhere" if blocker.is_symlink() else "a file"
        _fail(path, f"output root {str(root)!r}: {str(blocker)!r} is {what}, not a folder (choose another "
                    f"output_root)")
    evals = _eval_spec(path, spec.get("evals"))
    axis_keys = list(axes)
    runs, names, trained_alike, evaluated_methods = [], {}, {}, set()
    for combination in itertools.product(*(axes[k] for k in axis_keys)):
        values = dict(zip(axis_keys, combination))
        own = {k: v for k, v in values.items() if k != "config"}
        previous = {}
        for index, stage in enumerate(stages):
            config_file = values.get("config", stage.get("config"))
            if config_file:
                config_file = find_config(config_file, path, f"grid {str(path)!r}")
            layers = [*(config_layers(config_file) if config_file else []),
                      (f"grid {str(path)!r}", {**flags, **(stage.get("flags") or {}), **own})]
            program = training_program({k: v for _, layer in layers for k, v in layer.items()},
                                       stage.get("program"), f"grid {str(path)!r}")
            # The grid's own values override its config's, whatever spelling (flag or alias) each uses, and a
            # length given in one unit replaces an earlier layer's in the other (swav_small.yaml's
            # freeze_prototypes_epochs its base's niters), as the program merges them.
            *base, chosen = canonical_layers(program, layers)
            parser = program_parser(program, {key: value for layer in (*base, chosen) for key, value in layer.items()})
            merged = {}
            for layer in (*base, chosen):
                # (a null in the grid's own layer is left off the job's command line: it names nothing there)
                named = {key for key, value in layer.items() if value is not None or layer is not chosen}
                for replaced in replaced_alternatives(parser, named):
                    merged.pop(replaced, None)
                merged.update(layer)
            label = run_name({**merged, **values}, axis_keys, stage.get("name"))
            if label in names:
                _fail(path, f"runs {names[label]} and {values} get the same name {label!r}")
            names[label] = values
            if stage.get("pretrained_from"):
                merged["pretrained"] = str(root / previous[stage["pretrained_from"]])
            checked = validate_flags(program, merged, f"grid {str(path)!r} run {label!r}")
            # Values that differ only in their YAML spelling (epochs 2 and 2.0) name two runs that train alike.
            flags_key = (program, json.dumps(checked, sort_keys=True, default=str))
            if flags_key in trained_alike:
                _fail(path, f"runs {trained_alike[flags_key]!r} and {label!r} train with the same flags")
            trained_alike[flags_key] = label
            run_flags = {"config": str(config_file)} if config_file else {}
            run_flags.update({k: checked[k] for k in chosen})
            if "pretrained" in merged:
                run_flags["pretrained"] = merged["pretrained"]
            run_flags["output_dir"] = str(root / label)
            epochs = int(checked.get("epochs") or program_parser(program, merged).get_default("epochs")
                         or 0)
            run = RunSpec(label, program, run_flags, values, settings=checked, epochs=epochs,
                          stage=stage.get("name"),
                          after=previous.get(stages[index - 1].get("name")) if index else None,
                          reads_data_path=reads_data_path(program, checked))
            if index == len(stages) - 1:
                method = trained_method(program, checked)
                if method not in evaluated_methods:  # once per method, not per run
                    evaluated_methods.add(method)
                    for eval_program, eval_flags in evals["flags"].items():
                        check_eval_flags(eval_program, eval_flags, method, f"grid {str(path)!r} run {label!r}")
                run.evals = _expand_evals(evals, run, epochs)
            # The config's checkpoint_epochs too: the list given on the command line replaces the config's.
            wanted = sorted({e.epoch for e in run.evals if e.epoch is not None}
                            | set(checked.get("checkpoint_epochs") or []))
            if wanted:
                run.flags["checkpoint_epochs"] = wanted
            previous[stage.get("name")] = label
            runs.append(run)
    resources, eval_resources = _grid_resources(path, spec)
    return Grid(name, path, runs, resources, eval_resources)


def _axes_and_flags(path: Path, spec: dict, stages: list[dict]) -> tuple[dict, dict]:
    """The grid's axes (flag -> values) and fixed flags, checked: non-empty lists, no flag both, no `config` flag,
    no `output_dir` anywhere."""
    axes = spec.get("axes") or {}
    if not isinstance(axes, dict) or not axes:
        _fail(path, "needs `axes`, a mapping of flag names to lists of values")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            _fail(path, f"axis {key!r} must be a non-empty list of values (got {values!r})")
    if "config" in axes and len(stages) > 1:
        _fail(path, "`config` cannot be an axis of a grid with stages (each stage names its own)")
    flags = spec.get("flags") or {}
    if not isinstance(flags, dict):
        _fail(path, "`flags` must be a mapping of flag names to values")
    overlap = sorted(set(flags) & set(axes))
    if overlap:
        _fail(path, f"key {overlap[0]!r} is both an axis and a fixed flag")
    if "config" in flags:
        _fail(path, "name the base config with the `config:` key, or make `config` an axis")
    placed = [("flags", flags), ("axes", axes), *(("stage flags", stage.get("flags") or {}) for stage in stages)]
    for where, given in placed:
        if "output_dir" in given:
            _fail(path, f"`output_dir` in {where}: each run's directory is OUTPUT_ROOT/RUN_NAME; set `output_root` "
                        f"(or launch.py --output_root) instead")
    return axes, flags


def _grid_resources(path: Path, spec: dict) -> tuple[dict, dict]:
    """The training jobs' resources and the evaluation jobs' (each key eval_resources leaves out is the training
    jobs', but their shape)."""
    resources = resolve_resources(path, spec.get("resources"), "resources")
    eval_given = spec.get("eval_resources") or {}
    if not isinstance(eval_given, dict):
        _fail(path, "eval_resources must be a mapping")
    # The shape of the training job (nodes, tasks) is not inherited: an evaluation's is one node, a task per GPU.
    inherited = {key: value for key, value in (spec.get("resources") or {}).items()
                 if key not in ("nodes", "tasks_per_node") or not eval_given}
    eval_resources = resolve_resources(path, {**inherited, **eval_given}, "eval_resources")
    return resources, eval_resources


def _stages(path, spec: dict) -> list[dict]:
    """The grid's training stages: `stages` (a pipeline: each may start from an earlier one's run with
    `pretrained_from`), or one unnamed stage made of the top-level `program` and `config`."""
    if not spec.get("stages"):
        stages = [{"name": None, "program": spec.get("program"), "config": spec.get("config")}]
    elif "program" in spec or "config" in spec:
        _fail(path, "with `stages`, each stage names its own program and config (no top-level ones)")
    elif not isinstance(spec["stages"], list):
        _fail(path, f"`stages` must be a list of stages (got {spec['stages']!r})")
    else:
        stages = spec["stages"]
    seen = []
    for stage in stages:
        if not isinstance(stage, dict):
            _fail(path, "each stage must be a mapping with name, program, config, flags, pretrained_from")
        if not isinstance(stage.get("flags") or {}, dict):
            _fail(path, f"stage {stage.get('name')!r}: `flags` must be a mapping of flag names to values (got "
                        f"{stage['flags']!r})")
        unknown = sorted(set(stage) - STAGE_KEYS)
        if unknown:
            _fail(path, f"unknown stage key {unknown[0]!r} (valid: {', '.join(sorted(STAGE_KEYS))})")
        if stage.get("program") is not None and stage["program"] not in TRAINING_PROGRAMS:
            _fail(path, f"program {stage['program']!r} is not one of: {', '.join(TRAINING_PROGRAMS)}")
        if len(stages) > 1 and not stage.get("name"):
            _fail(path, "every stage of a pipeline needs a `name`")
        if stage.get("name") is not None:
            check_name(stage["name"], f"grid {str(path)!r}: stage name", STAGE_NAME, STAGE_NAME_CHARACTERS)
        if stage.get("pretrained_from") and stage["pretrained_from"] not in seen:
            _fail(path, f"stage {stage.get('name')!r}: pretrained_from {stage['pretrained_from']!r} is not an "
                        f"earlier stage")
        seen.append(stage.get("name"))
    return stages


def _eval_spec(path, evals) -> dict:
    if evals is None:
        return {"programs": [], "flags": {}, "epochs": ["final"]}
    if not isinstance(evals, dict):
        _fail(path, "`evals` must be a mapping with programs, flags, epochs")
    unknown = sorted(set(evals) - EVAL_KEYS)
    if unknown:
        _fail(path, f"unknown key evals.{unknown[0]!r} (valid: {', '.join(sorted(EVAL_KEYS))})")
    programs = evals.get("programs") or []
    if not isinstance(programs, list):
        _fail(path, f"evals.programs must be a list of programs among {', '.join(EVAL_PROGRAMS)} (got {programs!r})")
    for program in programs:
        if program not in EVAL_PROGRAMS:
            _fail(path, f"evals program {program!r} is not one of: {', '.join(EVAL_PROGRAMS)}")
    flags = evals.get("flags") or {}
    if not isinstance(flags, dict):
        _fail(path, f"evals.flags must be a mapping of programs to their flags (got {flags!r})")
    for program, values in flags.items():
        if program not in programs:
            _fail(path, f"evals.flags names {program!r}, which is not in evals.programs")
        if not isinstance(values, dict):
            _fail(path, f"evals.flags.{program} must be a mapping of flag names to values (got {values!r})")
        validate_flags(program, {**values, "run": "x"}, f"grid {str(path)!r} evals.flags.{program}")
    epochs = ["final"] if evals.get("epochs") is None else evals["epochs"]
    if not isinstance(epochs, list) or any(not (e == "final" or (isinstance(e, int) and e > 0)) for e in epochs):
        _fail(path, f"evals.epochs must list positive epochs or 'final' (got {epochs!r})")
    # (an empty list, or epochs without a program, evaluated the final checkpoint, or nothing, without a word)
    if not epochs:
        _fail(path, "evals.epochs is empty: list the epochs to evaluate, 'final' among them or not (left out: final)")
    if evals.get("epochs") is not None and not programs:
        _fail(path, f"evals.epochs {epochs!r} given, but evals.programs lists no program to evaluate them with "
                    f"(among {', '.join(EVAL_PROGRAMS)})")
    # One evaluation per program and checkpoint, however often the grid names them (--k 20 20 is one kNN too).
    return {"programs": list(dict.fromkeys(programs)), "flags": flags, "epochs": list(dict.fromkeys(epochs))}


def _expand_evals(evals: dict, run: RunSpec, epochs: int) -> list[EvalSpec]:
    specs = []
    for epoch in evals["epochs"]:
        if epoch != "final" and epochs and epoch > epochs:
            run.epochs_past_end.append(epoch)
            continue
        if epoch != "final" and epochs and epoch == epochs and "final" in evals["epochs"]:
            continue  # the final checkpoint (the same weights), evaluated once
        checkpoint = "checkpoint.pth" if epoch == "final" else f"checkpoint_ep{epoch:04d}.pth"
        for program in evals["programs"]:
            flags = {"run": str(run.run_dir), "checkpoint": checkpoint, "skip_recorded": True,
                     **evals["flags"].get(program, {})}
            specs.append(EvalSpec(program, flags, checkpoint, None if epoch == "final" else epoch,
                                  epochs if epoch == "final" else epoch))
    return specs
