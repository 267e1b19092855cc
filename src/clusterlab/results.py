"""Metrics records: one JSON object per evaluation, appended to RUN/metrics.jsonl; read back for the tables.

A record: run, method, dataset, split, backbone, epoch and step (where the checkpoint stands: step 0 at an epoch's
end, taken so for records written before they named it), checkpoint, seed, eval (knn | linear | cluster: k-means and
heads alike, told apart by the protocol's `assignment`), protocol (the settings that make numbers comparable) and
metrics, plus when it was created and the git commit of the code that evaluated (git_commit, git_dirty). A table
row's `revision` says whether every run and evaluation behind it came from committed code: clean, dirty (uncommitted
changes to tracked files) or unknown (no commit recorded: a run older than the field, or an installed copy outside a
git checkout).

A table row averages the records of one (dataset, method, backbone, epoch, eval, protocol) over the runs (seeds)
that share the training settings (`run_settings`: RUN/config.yaml's args without the flags that do not change what
is learnt); where runs with different settings would share a row, it is split by a `recipe` column naming the flags
that differ (`recipe_labels`).
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import tempfile
import textwrap
import warnings
from pathlib import Path
from typing import NamedTuple

from . import rundir
from .config import git_state, recorded_git_state, written_run_config
from .errors import ConfigError, printable
from .models import backbone_label
from .programs import EVAL_PROGRAMS

EVAL_KINDS = tuple(EVAL_PROGRAMS.values())  # what a record's "eval" says: knn, linear, cluster
PROTOCOL_COLUMNS = ("data", "train_images", "fit_on", "features", "k", "temperature", "train_features", "selection", "superclass",
                    "clusters", "mapping", "head", "augmentation", "epochs")


def make_record(args, *, eval_kind: str, dataset: str, protocol: dict, metrics: dict,
                position: tuple[int, int] | None, checkpoint_name: str | None, run: str, split: str = "test") -> dict:
    """A metrics record of the run trained with `args`, scored on `dataset` (the scored set's name: a run may be
    scored on another set than it trained on); `position` is the checkpoint's (epoch, step) (None for a baseline):
    step 0 at the end of an epoch, more in a checkpoint a stop signal saved mid-epoch."""
    epoch, step = position or (None, None)
    return {"run": run, "method": args.method, "dataset": dataset, "split": split,
            "backbone": backbone_label(args.arch, args.width) if getattr(args, "arch", None) else "none",
            "epoch": epoch, "step": step, "checkpoint": checkpoint_name, "seed": getattr(args, "seed", None),
            "eval": eval_kind,
            "protocol": protocol, "metrics": metrics, "created": rundir.now_iso(), **git_state()}


def append_record(run_dir: str | os.PathLike, record: dict) -> None:
    """One line in RUN/metrics.jsonl, whole even when evaluations of the run write side by side."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rundir.append_jsonl(run_dir / "metrics.jsonl", record, durable=True)


def require_writable(run_dir: str | os.PathLike) -> None:
    """Meet now, before an evaluation's work, the error that appending its record would meet once the work is done
    (a read-only file system, a folder one may not write to, a record file one may not write to or that links to a
    folder that does not exist): the closest existing folder of `run_dir` takes a nameless temporary file. Every
    rank asks, so that all of them leave together."""
    records = Path(run_dir) / "metrics.jsonl"
    if records.is_symlink() and not Path(os.path.realpath(records)).parent.is_dir():
        raise ConfigError(f"{records} links to {os.readlink(records)!r}, in a folder that does not exist: the "
                          f"record could not be written (remove the link, or make that folder)")
    if records.exists() and not os.access(records, os.W_OK):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(records))
    folder = Path(run_dir).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:  # (which names a file of its own choosing where it cannot make a nameless one)
        raise OSError(error.errno, error.strerror, str(folder)) from None


class Wanted(NamedTuple):
    """What a record must name to stand for an evaluation: its dataset, one of the forms its test view may be named
    in (None: the protocol says all), and its checkpoint's (epoch, step). None: any."""
    dataset: str | None = None
    views: list[dict] | None = None
    position: tuple[int, int] | None = None


def skip_recorded(args, run_dir, eval_kind: str, checkpoint_name: str | None, protocol: dict | None,
                  wanted: Wanted) -> bool:
    """Whether an evaluation program's --skip_recorded applies: RUN already holds this evaluation of these weights
    (`wanted`). A record names the data it was measured on only once that data is open, so data the command names
    itself (--dataset / --data_path) is always evaluated."""
    if not (args.skip_recorded and run_dir and checkpoint_name) or args.dataset or args.data_path:
        return False
    views = [{}] if wanted.views is None else wanted.views
    return has_record(run_dir, eval_kind, checkpoint_name, [{**(protocol or {}), **view} for view in views],
                      wanted.dataset, wanted.position)


def has_record(run_dir: str | os.PathLike, eval_kind: str, checkpoint_name: str,
               protocols: list[dict] | None = None, dataset: str | None = None,
               position: tuple[int, int] | None = None) -> bool:
    """Whether RUN/metrics.jsonl already holds this evaluation of this checkpoint (with one of these protocols, on
    this dataset and at this (epoch, step), if given). checkpoint.pth moves on as a run trains or is extended: a
    record of it at another epoch is of other weights. A line the tables skip (read_records) records nothing."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return False
    for record in rundir.read_jsonl(path):
        if (record_fault(record) is None
                and record.get("eval") == eval_kind and record.get("checkpoint") == checkpoint_name
                and dataset in (None, record.get("dataset"))
                and (position is None or (record.get("epoch"), record.get("step", 0)) == tuple(position))
                and any(all((record.get("protocol") or {}).get(k) == v for k, v in protocol.items())
                        for protocol in ([{}] if protocols is None else protocols))):
            return True
    return False


def files_named(root: str | os.PathLike, name: str, warn_unreadable: bool = True) -> list[Path]:
    """Every file called `name` below `root`, sorted, through linked folders too (runs kept on scratch space and
    linked into a results folder; pathlib's rglob does not enter links), each folder once (a link cycle ends). Each
    level's real folders are walked before its links. A folder that cannot be read is named in a warning (its runs
    would be missing from the tables' counts without a word)."""

    def unreadable(err: OSError) -> None:
        if warn_unreadable:
            warnings.warn(f"{printable(str(err.filename))}: cannot be read ({err.strerror}): the runs below it are "
                          f"left out", stacklevel=3)

    found, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True, onerror=unreadable):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        # a folder is read under its own path where the root holds it, else under the first link (in name order)
        subfolders.sort(key=lambda name: (os.path.islink(os.path.join(folder, name)), name))
        found += [Path(folder) / name] * (name in names)
    return sorted(found)


REWOUND_RECORDS = "metrics.rewound.jsonl"
PROBE_FOLDER = re.compile(r"linear_ep(\d+)(?:_step(\d+))?")  # eval_linear.probe_dir's names, with their position


def own_probes(run_dir: Path) -> list[tuple[Path, tuple[int, int]]]:
    """The linear probes of the run's own checkpoints, with the (epoch, step) each probes (a probe of another
    directory's checkpoint carries a `_from` tag)."""
    probes = []
    for probe in sorted(run_dir.glob("linear_ep*")):
        match = PROBE_FOLDER.match(probe.name)
        if probe.is_dir() and match and "_from" not in probe.name:
            probes.append((probe, (int(match[1]), int(match[2] or 0))))
    return probes


def set_aside_evaluations_after(run_dir: str | os.PathLike, position: tuple[int, int]) -> list[str]:
    """Move the records and linear probes of the run's own checkpoints at a later (epoch, step) than `position`, the
    one training resumes from, out of the way: to RUN/metrics.rewound.jsonl and RUN/rewound_linear_ep*. Only a
    checkpoint.pth replaced by an older one leaves such evaluations (a run rewound, as after a NaN loss), and the
    weights trained again are other weights at the same positions: --skip_recorded, eval_linear's resumed probe and
    the tables would take the old numbers for theirs. Returns what was moved, for a note."""
    run_dir = Path(run_dir)

    def later(epoch, step) -> bool:
        return isinstance(epoch, int) and (epoch, step or 0) > tuple(position)

    moved = []
    count = rundir.move_jsonl_lines(run_dir / "metrics.jsonl", run_dir / REWOUND_RECORDS, lambda record: (
        not foreign_checkpoint(record.get("checkpoint")) and later(record.get("epoch"), record.get("step"))))
    if count:
        moved.append(f"{count} record(s) of metrics.jsonl to {REWOUND_RECORDS}")
    for probe, (epoch, step) in own_probes(run_dir):
        if later(epoch, step):
            target = run_dir / f"rewound_{probe.name}"
            suffix = 1
            while target.exists():
                suffix += 1
                target = run_dir / f"rewound{suffix}_{probe.name}"
            probe.rename(target)
            moved.append(f"{probe.name}/ to {target.name}/")
    return moved


# A record's dataset names its table's files (DATASET.csv, DATASET_top1.png): no folder, nothing hidden.
TABLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def record_fault(record) -> str | None:
    """Why a line of metrics.jsonl, parsed, is not a record the tables can use (None where it is one)."""
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict) \
            or not isinstance(record.get("protocol") or {}, dict):
        return "not a metrics record"
    if not isinstance(record.get("dataset"), str):
        return "no dataset named: no table to put it in"
    if not TABLE_NAME.fullmatch(record["dataset"]):
        return (f"dataset {record['dataset']!r} could not name a table's files (letters, digits and _.-, starting "
                f"with a letter or digit)")
    for key in ("run", "method", "split", "backbone", "eval", "checkpoint"):
        if not isinstance(record.get(key), (str, type(None))):
            return f"{key} {record[key]!r} is not text"
    if record.get("eval") not in EVAL_KINDS:  # a record without one of them is another program's
        return f"eval {record.get('eval')!r} is none of {', '.join(EVAL_KINDS)}: not a metrics record of this suite"
    if not isinstance(record.get("protocol"), dict):  # (a blank protocol would be compared with published numbers)
        return "no protocol: not a metrics record of this suite"
    for key in ("epoch", "step", "seed"):
        if record.get(key) is not None and not _whole(record[key]):
            return f"{key} {record[key]!r} is not a whole number"
    return None


def read_records(root: str | os.PathLike) -> list[dict]:
    """Every well-formed record under `root`; a corrupt or partial line is skipped with a warning naming it."""
    records = []
    for path in files_named(root, "metrics.jsonl"):
        try:
            text = path.read_text(errors="replace")
        except OSError as err:  # a link to nowhere, a file without read permission
            warnings.warn(f"{printable(str(path))}: skipped (cannot be read: {err.strerror})", stacklevel=2)
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                warnings.warn(f"{path}:{number}: skipped ({err})", stacklevel=2)
                continue
            fault = record_fault(record)
            if fault:
                warnings.warn(f"{path}:{number}: skipped ({fault})", stacklevel=2)
                continue
            record["_file"] = str(path)
            record["_run_path"] = run_path(path.parent, Path(root))
            records.append(record)
    return records


def run_path(run_dir: Path, root: Path) -> str:
    """How tables and warnings name a run: its folder below `root` (two runs of one name in two folders are told
    apart), the root's own name for the root itself."""
    below = run_dir.relative_to(root).as_posix()
    return below if below != "." else root.resolve().name


METRIC_COLUMNS = ("top1", "top5", "best_top1_on_test", "acc", "nmi", "ami", "ari")
# Every metric is a fraction in [0, 1] but the chance-adjusted ones, negative below chance (ARI from -0.5).
METRIC_LOWEST = {"ami": -1.0, "ari": -1.0}
GROUP_COLUMNS = ("dataset", "method", "backbone", "epoch", "eval")
# One state of the weights: checkpoint.pth and checkpoint_epNNNN.pth saved together at the end of epoch NNNN are the
# same (the tables hold epochs' ends only: see records_frame).
DUPLICATE_COLUMNS = ("file", "run", "epoch", "seed", "dataset", "split", "eval")
# A row is as doubtful as its most doubtful record.
REVISIONS = ("clean", "unknown", "dirty")
REVISION_NOTES = {"dirty": "trained or evaluated by code with uncommitted changes to tracked files",
                  "unknown": "no commit recorded (written before runs recorded one, by an installed copy, "
                              "or a trained run whose config.yaml is missing: its settings are unknown too)"}


def revision(record: dict, run_config: dict | None) -> str:
    """clean, dirty or unknown: the code that evaluated (the record's git fields; for a linear probe, every start of
    the probe: the record's `trained_by`) and, for a trained run, the code that trained it at every start
    (config.yaml's `trained_by`; its git fields, of the last start, where a run written before it lacks one) and
    that trained each run its weights started from (`pretrained_from`); a baseline has no run config, a trained run
    without one (its config.yaml lost) is unknown."""
    states = [recorded_git_state(record), *(recorded_git_state(start) for start in record.get("trained_by") or []
                                            if isinstance(start, dict))]
    if run_config is None and record.get("epoch") is not None:  # a checkpoint's record (a baseline's has no epoch)
        states.append(recorded_git_state({}))
    origin = run_config
    while isinstance(origin, dict):
        starts = origin.get("trained_by")
        if isinstance(starts, list):
            states += [recorded_git_state(start if isinstance(start, dict) else {}) for start in starts]
        elif origin is run_config:
            states.append(recorded_git_state(run_config))
        origin = origin.get("pretrained_from")
    if any(state["git_dirty"] for state in states):
        return "dirty"
    if any(state["git_dirty"] is None for state in states):
        return "unknown"
    return "clean"


# Flags of config.yaml's args that do not change what a run learns, left out of its training settings so that the seeds
# of one recipe stay one row: the seed (what a row averages over); where the run, its data and its recipe file are
# (output_dir, data_path, download, config: a path differs per machine or per seed, and args already hold every value
# the recipe file set); pretrained (the path of the run a later stage starts from, which differs per seed; what that
# run was is compared instead, from config.yaml's pretrained_from: `run_settings`); how it ran (device, workers,
# compile and channels_last, which compute the same up to float rounding; find_unused, a DDP bookkeeping switch); and
# what it writes on the side (log_every, checkpoint_epochs, the kNN monitor's knn_monitor_every/_k/_features, which
# only log); and SCAN's mining_crop, compared as the view config.yaml records as neighbours_mined_on (the one the
# run mined on at its first start, which a resume with another --mining_crop does not change); and a linear probe's
# run, checkpoint and skip_recorded (the path of the run it probes, which a moved run changes, and the name of its
# weights: the probe's folder stands for one state of them; whether to skip a recorded evaluation). Everything else
# stays, including amp, sync_bn, sinkhorn_dtype, label_dtype and label_batch_size (precision and batch statistics
# change the numbers: amp is compared as the precision that ran, config.yaml's `precision`, since --amp auto is bf16
# on one device and float32 on another) and epochs (a checkpoint of a 400-epoch schedule is not one of a 200-epoch
# schedule).
NOT_SETTINGS = frozenset({"seed", "output_dir", "data_path", "download", "config", "pretrained", "device", "workers",
                          "compile", "channels_last", "find_unused", "log_every", "checkpoint_epochs",
                          "knn_monitor_every", "knn_monitor_k", "knn_monitor_features", "mining_crop", "run",
                          "checkpoint", "skip_recorded"})
# The recipe label of a run whose settings are unknown (no readable config.yaml) in a row split by recipe.
UNKNOWN_RECIPE = "unknown"


def run_settings(run_config: dict | None) -> dict | None:
    """The training settings of a run: its config.yaml's args without NOT_SETTINGS, in their recorded order, then
    those of the run its weights started from (config.yaml's pretrained_from: its method, the epoch and step it
    stood at and its flags, prefixed `pretrained.`; again for that run's own start; `pretrained.method` None for a
    main_cluster.py run from scratch, UNKNOWN_RECIPE for one whose start config.yaml does not describe); None when
    unknown (a baseline, which has no config.yaml, or one that cannot be read)."""
    args = (run_config or {}).get("args")
    if not isinstance(args, dict):
        return None
    settings = {key: value for key, value in args.items() if key not in NOT_SETTINGS}
    if "amp" in settings and isinstance(run_config.get("precision"), str):
        settings["amp"] = run_config["precision"]
    settings.update(_recorded_settings(run_config))
    origin, prefix = run_config.get("pretrained_from"), "pretrained."
    if "pretrained" in args and not isinstance(origin, dict):
        # from scratch: a start known as well as any other; from a run that config.yaml does not describe (written
        # before it recorded pretrained_from): not to be averaged with either
        settings["pretrained.method"] = UNKNOWN_RECIPE if args["pretrained"] else None
    while isinstance(origin, dict):
        settings[f"{prefix}method"], settings[f"{prefix}epoch"] = origin.get("method"), origin.get("epoch")
        settings[f"{prefix}step"] = origin.get("step", 0)
        origin_args = origin.get("args") if isinstance(origin.get("args"), dict) else {}
        origin_settings = {key: value for key, value in origin_args.items()
                           if key not in NOT_SETTINGS and key != "method"}
        if "amp" in origin_settings and isinstance(origin.get("precision"), str):
            origin_settings["amp"] = origin["precision"]  # as the run's own amp: the precision that ran
        origin_settings.update(_recorded_settings(origin))
        if isinstance(origin.get("resume_changes"), list) and _whole(origin.get("epoch")):
            # the first stage's resumes that changed what it learnt (a run extended with a larger --epochs), as
            # for the run's own checkpoints: a stage 2 on an extended embedding is no seed of one on an embedding
            # trained to that length from the start
            origin_settings = settings_at(origin_settings, origin["resume_changes"],
                                          (origin["epoch"], origin.get("step", 0) or 0))
        settings.update({prefix + key: value for key, value in without_unread(origin_settings).items()})
        origin, prefix = origin.get("pretrained_from"), "pretrained." + prefix
    return settings


def without_unread(settings: dict | None) -> dict | None:
    """`settings` (a run's at one position, `settings_at`'s: a resume may have changed its schedule) without the
    optimisation flags its optimiser and schedule do not read (optim.unread_flags: a --start_warmup recorded by a
    run without a warm-up): runs that trained alike are one recipe whatever those hold. Keys of the run it started
    from (`pretrained.`) are not its own flags and stay. A record without the flags the table needs (an older
    version's) is left whole."""
    if settings is None:
        return None
    from .optim import unread_flags

    try:
        unread = unread_flags(argparse.Namespace(**settings))
    except (AttributeError, TypeError):
        return settings
    return {key: value for key, value in settings.items() if key not in unread}


def _recorded_settings(run_config: dict) -> dict:
    """What config.yaml records beside the flags that shapes what a run learns: what the training split held
    (`training_set`; data_path, left out of the flags, differs per machine: two image folders are two recipes), the
    view a SCAN run mined its neighbours on (`neighbours_mined_on`, which --mining_crop 0 leaves to the pre-trained
    run) and, where it shapes the training (`processes_shape_training`), its number of processes."""
    found = {}
    trained_on = run_config.get("training_set")
    if isinstance(trained_on, dict):
        found["training_set.images"] = trained_on.get("images")
        found["training_set.fingerprint"] = trained_on.get("fingerprint")
    mined_on = run_config.get("neighbours_mined_on")
    if isinstance(mined_on, dict):
        found["neighbours_mined_on"] = mined_on.get("crop")
    if _whole(run_config.get("world_size")) and processes_shape_training(run_config.get("args") or {}):
        found["world_size"] = run_config["world_size"]
    return found


def processes_shape_training(args: dict) -> bool:
    """Whether a run's number of processes is part of what it trains (as the engine notes a resume on another
    number): Un-Mix pairs images inside each rank's share, and local batch norm (`--sync_bn false`) normalises each
    share on its own. Fresh runs of such a recipe on 1 and on 2 processes were averaged as seeds of one row."""
    return args.get("method") == "unmix" or args.get("sync_bn") is False


def settings_at(settings: dict | None, changes, position: tuple[int, int]) -> dict | None:
    """The settings the weights at `position` (epoch, step) were trained under. config.yaml's args (and precision)
    are its last start's: a change (config.yaml's `resume_changes`, one per resume that changed a flag, the
    precision or, where it matters, the number of processes) made at or after `position` came later, and the
    earlier values apply; one made before is named in `resume_changes` (`epochs 2->3 at the end of epoch 2`, "none" for
    a run never changed), so that a run extended with a larger --epochs is no seed of one trained to that length
    from the start. A run written before config.yaml kept the changes is compared without the key."""
    if settings is None or not isinstance(changes, list):
        return settings
    settings, earlier = dict(settings), []
    for change in reversed(changes):
        if not (isinstance(change, dict) and isinstance(change.get("before"), dict)
                and isinstance(change.get("after"), dict)
                and _whole(change.get("epoch")) and _whole(change.get("step"))):
            continue  # not written by the engine (edited by hand): no position to compare
        if (change["epoch"], change["step"]) >= position:
            settings.update(change["before"])
        else:
            earlier.insert(0, change)
    settings["resume_changes"] = "; ".join(
        " ".join(f"{key} {_setting_text(before)}->{_setting_text(change['after'].get(key))}"
                 for key, before in change["before"].items())
        + f" at {rundir.position_words(change['epoch'], change['step'])}" for change in earlier) or "none"
    return settings


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def foreign_checkpoint(name: str | None) -> bool:
    """Whether a record's checkpoint name is of another directory's file: records name the run's own checkpoints
    by file name, any other by its full path (eval/features.load_run)."""
    return isinstance(name, str) and Path(name).name != name


def records_frame(records: list[dict]):
    """One row per record: the identifying columns, the revision, the run's training settings (`run_settings`), the
    protocol flattened, the metrics (as percentages). Tables are of runs' own weights at epochs' ends: a record of
    a checkpoint of another directory, or of one a stop signal saved mid-epoch, is left out with a warning naming
    it."""
    import pandas as pd

    rows, run_configs = [], {}
    for record in records:
        if foreign_checkpoint(record.get("checkpoint")):
            warnings.warn(f"{record.get('_file')}: the record of {record['checkpoint']}, a checkpoint of another "
                          f"directory, is left out of the tables (they hold each run's own weights)", stacklevel=2)
            continue
        if record.get("step") not in (None, 0):
            warnings.warn(f"{record.get('_file')}: the record of {record.get('checkpoint')} at "
                          f"{rundir.position_words(record.get('epoch'), record.get('step'))} (saved mid-epoch) is "
                          f"left out of the "
                          f"tables, which hold epochs' ends", stacklevel=2)
            continue
        row = {key: record.get(key) for key in ("run", "method", "dataset", "split", "backbone", "epoch", "seed",
                                                "eval", "checkpoint")}
        row["file"] = record.get("_file")
        row["run_path"] = record.get("_run_path", record.get("run"))
        run_dir = Path(row["file"]).parent if row["file"] else None
        trained = record.get("epoch") is not None  # a checkpoint's record (a baseline has no epoch nor config.yaml)
        seen = run_dir in run_configs
        if not seen:
            run_configs[run_dir] = written_run_config(run_dir) if run_dir else None
        # unreadable, or missing where a run trained (a baseline has none): how it trained cannot be told
        unknown = run_dir is not None and (run_configs[run_dir] == {} or (trained and run_configs[run_dir] is None))
        if unknown and not seen:
            why = "cannot be read" if run_configs[run_dir] == {} else "is missing"
            warnings.warn(f"{run_dir / 'config.yaml'} {why}: its run's settings and code are unknown "
                          f"(recipe {UNKNOWN_RECIPE}, revision unknown, no published number)", stacklevel=2)
        row["revision"] = revision(record, run_configs[run_dir])
        position = (record["epoch"] if _whole(record.get("epoch")) else 0, 0)  # an epoch's end (mid-epoch: above)
        row["settings"] = without_unread(settings_at(run_settings(run_configs[run_dir]),
                                                     (run_configs[run_dir] or {}).get("resume_changes"), position))
        row["run_epochs"] = (row["settings"] or {}).get("epochs")
        row["settings_unknown"] = trained and unknown  # (no paper's number: whether it ended here is unknown too)
        protocol = record.get("protocol") or {}
        for key in PROTOCOL_COLUMNS:
            row[key] = protocol.get(key)
        row["protocol"] = protocol_label(protocol)
        for key in METRIC_COLUMNS:
            value = record["metrics"].get(key)
            low = METRIC_LOWEST.get(key, 0.0)
            usable = rundir.is_number(value) and math.isfinite(value) and low <= value <= 1.0
            if value is not None and not usable:
                warnings.warn(f"{record.get('_file')}: the {key} of {record.get('checkpoint')} at epoch "
                              f"{record.get('epoch')} is {value!r}, not a fraction in [{low:g}, 1]: left out",
                              stacklevel=2)
            row[key] = 100.0 * value if usable else None
        given = [key for key in METRIC_COLUMNS if record["metrics"].get(key) is not None]
        if given and all(row[key] is None for key in given):
            # every number it gave was left out above: a row of it scored nothing, yet had n=1 (an older record of
            # the same evaluation, if any, stands)
            continue
        rows.append(row)
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["epoch"] = pd.to_numeric(frame["epoch"], errors="coerce").astype("Int64")
    return frame


def protocol_label(protocol: dict) -> str:
    """A short, stable text for a protocol dict, e.g. `k=200 T=0.1 backbone recomputed last`. The chosen head's
    index is left out: seeds that choose different heads are seeds of one result (each record keeps it), as long
    as the heads have one size (another number of clusters, possibly another mapping, is another protocol)."""
    parts = []
    for key in sorted(protocol):
        if key == "head" and protocol.get("chosen") is True:
            continue
        value = protocol[key]
        if key == "temperature":
            key = "T"
        if isinstance(value, bool):
            if value:
                parts.append(key)
        elif value is not None:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _setting_text(value) -> str:
    """A flag's value as a recipe label shows it: `true`, `2,6` for a list, `none`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(map(_setting_text, value)) if value else "[]"
    return str(value)


def recipe_labels(settings: list) -> list[str] | None:
    """For the records of one would-be row, given their runs' training settings (dicts; None where unknown): None
    when they all agree (or all are unknown), else each record's label naming the flags that differ among the known
    ones, in their recorded order (`queue_length=3840 epoch_queue_starts=15`; empty where none differ), and
    UNKNOWN_RECIPE for a run without settings: no seed of any known recipe, however those agree (averaged with them
    where they agreed, it was a row of its own in the same table where they did not).

    A flag that only some known runs record is compared only where those that record it disagree on it (then a run
    without it is `FLAG=unrecorded`, a recipe of its own): a run trained before a flag existed (or under its old
    name) evaluates with its default, so a flag it lacks is no evidence of another recipe."""
    known = [s for s in settings if s is not None]
    if not known:
        return None
    differ = _differing_flags(known)
    if not differ and len(known) == len(settings):
        return None
    return [UNKNOWN_RECIPE if s is None else " ".join(f"{key}={_setting_text(s[key]) if key in s else 'unrecorded'}"
                                                      for key in differ)
            for s in settings]


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _differing_flags(known: list[dict]) -> list[str]:
    """The flags, in their recorded order, on which the runs that record them disagree: a flag some runs lack tells
    recipes apart only so (those that record it are no seeds of one recipe, whatever the others trained with)."""
    flags = dict.fromkeys(key for settings in known for key in settings)
    return [key for key in flags if len({_canonical(s[key]) for s in known if key in s}) > 1]


def latest_records(frame):
    """The newest record of each evaluation of each state of the weights: an evaluation run again (a requeued job, a
    repeated command, the final checkpoint and its epoch's copy) appends another record of the same numbers' kind;
    only the newest counts, so that n is the number of seeds."""
    return frame.drop_duplicates(subset=[c for c in (*DUPLICATE_COLUMNS, "protocol") if c in frame], keep="last")


SETTINGS_KEY = "settings_key"  # a column of `aggregate`'s table that only the plots read (not in the CSV)


def aggregate(frame):
    """Mean, std and n over seeds for every (dataset, method, backbone, epoch, eval, protocol) group of records
    whose runs share their training settings. A group whose runs were trained with different settings is split
    into one row per recipe, told apart by a `recipe` column (after `protocol`) that names the flags that differ
    (`recipe_labels`; empty in the rows of groups that need none); the column is there only when some group needs
    it, so a table of comparable runs has the columns it always had. n is the number of runs averaged; a row whose
    runs share a seed is named in a warning (its n and std would count copies of one run as seeds)."""
    import pandas as pd

    if frame.empty:
        return frame
    frame = latest_records(frame)
    keys = [c for c in (*GROUP_COLUMNS, "protocol") if c in frame]
    filled = frame.copy()
    # A checkpoint saved before its run's last epoch (--checkpoint_epochs) is mid-schedule: not comparable with a
    # number published for a run of that many epochs (see attach_published).
    mid_run = (pd.to_numeric(frame["run_epochs"], errors="coerce") > pd.to_numeric(frame["epoch"], errors="coerce")
               if "run_epochs" in frame and "epoch" in frame else pd.Series(False, index=frame.index))
    filled["mid_run"] = mid_run
    for key in keys:
        filled[key] = filled[key].astype(object).where(filled[key].notna(), "-")
    if "settings" in filled:
        recipes = pd.Series("", index=filled.index, dtype=object)
        for _, rows in filled.groupby(keys, sort=False, dropna=False):
            labels = recipe_labels(list(rows["settings"]))
            if labels is not None:
                recipes.loc[rows.index] = labels
        if (recipes != "").any():
            filled["recipe"] = recipes
            keys.append("recipe")
    metrics = [c for c in METRIC_COLUMNS if c in filled and filled[c].notna().any()]
    grouped = filled.groupby(keys, sort=True, dropna=False)
    if "seed" in filled:
        for key, rows in grouped:
            # (named: only the runs that share one, of a row of many; a baseline has no seed to share)
            shared = rows["seed"].notna() & rows["seed"].duplicated(keep=False)
            if shared.any():
                runs = ", ".join(f"{run} (seed {seed})" for seed, run in sorted(
                    {(int(seed), str(run)) for seed, run in zip(rows["seed"][shared], rows["run_path"][shared])}))
                warnings.warn(f"row {_row_name(key)}: {len(rows)} runs averaged as seeds, of which {shared.sum()} "
                              f"share a seed (copies of one run, or runs that differ where the row does not show, "
                              f"such as the seed of their --pretrained run): {runs}", stacklevel=2)
    if metrics:
        out = grouped[metrics].agg(["mean", "std"])
        out.columns = [f"{m}_{stat}" for m, stat in out.columns]
        out["n"] = grouped.size()
        counts = grouped[metrics].count()
        for metric in metrics:  # a metric some rows average over fewer runs than n: said, and its own count kept
            fewer = (counts[metric] > 0) & (counts[metric] < out["n"])
            for key in counts.index[fewer]:
                warnings.warn(f"row {_row_name(key)}: its {metric} averages {counts.at[key, metric]} of its "
                              f"{out.at[key, 'n']} runs (the others' records lack it, or left it out above)",
                              stacklevel=2)
            if fewer.any():
                out[f"{metric}_n"] = counts[metric]
    else:  # records with none of the known metrics: the rows, and how many runs each holds
        out = grouped.size().to_frame("n")
    if "revision" in filled:
        out["revision"] = grouped["revision"].agg(lambda states: max(states, key=REVISIONS.index))
    if "settings" in filled:
        # The training settings of the row's runs (shared, or the row would be split by recipe), for the plots: a
        # row's `recipe` is empty when its own group needs none, so it cannot tell which rows of other epochs come
        # from the same runs' recipe.
        out[SETTINGS_KEY] = grouped["settings"].agg(lambda values: _settings_key(values.iloc[0]))
    if mid_run.any():
        out["mid_run"] = grouped["mid_run"].any()
    if "settings_unknown" in filled and filled["settings_unknown"].any():
        out["settings_unknown"] = grouped["settings_unknown"].any()
    if "settings" in filled:
        # any of the row's runs (a run whose config.yaml predates resume_changes shares a row with one that has it)
        resumed = grouped["settings"].agg(lambda values: any(map(resumed_with_changes, values)))
        if resumed.any():
            out["resumed_with_changes"] = resumed
    return out.reset_index()


def _settings_key(settings) -> str:
    return _canonical(settings) if isinstance(settings, dict) else ""


def _on_common_keys(keys):
    """Settings keys (`_settings_key`) without the flags that only some of them record and those agree on."""
    parsed = {key: json.loads(key) for key in set(keys) if key}
    # as recipe_labels compares them; the flags every one records, as one intersection (asking, for each flag of
    # each recipe, whether all the others had it was quadratic in the recipes: minutes for a sweep of a thousand)
    every = set.intersection(*(set(settings) for settings in parsed.values())) if parsed else set()
    kept = set(_differing_flags(list(parsed.values()))) | every
    return keys.map(lambda key: _settings_key({k: v for k, v in parsed[key].items() if k in kept}) if key else "")


def _distinct_parts(protocols: list[str]) -> dict[str, str]:
    """Each protocol label without the parts that every one of `protocols` shares."""
    parts = {protocol: protocol.split(" ") for protocol in protocols}
    shared = set.intersection(*(set(words) for words in parts.values())) if len(parts) > 1 else set()
    return {protocol: " ".join(word for word in words if word not in shared) for protocol, words in parts.items()}


def _row_name(key: tuple) -> str:
    """A table row's group key as warnings name it: its parts that are not empty."""
    return " ".join(str(part) for part in key if part != "")


def revision_footnote(frame) -> str:
    """One line per revision other than clean found in the records `frame`, naming the run directories
    ('' when all are clean)."""
    if frame.empty or "revision" not in frame:
        return ""
    lines = []
    for state in REVISIONS[1:]:
        runs = sorted(set(frame.loc[frame["revision"] == state, "run_path"]))
        if runs:
            lines.append(f"revision {state}: {REVISION_NOTES[state]}: {', '.join(runs)}.")
    return "\n".join(lines)


def attach_published(table, published):
    """Add `published`, `vs`, `diff` and `source` where method, dataset, backbone (where the CSV gives one: a number
    of another network is no yardstick), evaluation and epochs match, and the row's runs ended at that epoch (not a
    mid-schedule checkpoint of a longer run: `mid_run`) and were trained to it as they were started (none of them
    `resumed_with_changes`), whose settings are known (none `settings_unknown`: a trained run without config.yaml),
    on a protocol that measures what the paper's does (`comparable_protocol`); the protocols are not compared
    further (`source` names upstream's, the row's `protocol` ours).

    `vs` is the metric of ours the published number is compared with: the CSV's `compare_to` column when given
    (e.g. best_top1_on_test beside a number that upstream selected on the test set), else its `metric`.
    """
    if published is None or published.empty or table.empty:
        return table
    table = table.copy()
    table["published"], table["vs"], table["source"], table["diff"] = None, None, None, None
    mid_run = table.get("mid_run")
    for index, row in table.iterrows():
        if (mid_run is not None and mid_run[index]) or not comparable_protocol(row.get("protocol"), row["eval"]) \
                or row.get("resumed_with_changes") is True or row.get("settings_unknown") is True:
            continue
        same_backbone = (published["backbone"].isna() | (published["backbone"] == row["backbone"])
                         if "backbone" in published else True)
        names = published_names(row["dataset"], row.get("protocol"))
        match = published[(published["method"] == row["method"]) & published["dataset"].isin(names)
                          & same_backbone & (published["eval"] == row["eval"])
                          & (published["epochs"].map(_epochs_key) == _epochs_key(row["epoch"]))]
        if match.empty:
            continue
        first = match.iloc[0]
        compare_to = first.get("compare_to")
        metric = compare_to if isinstance(compare_to, str) and compare_to else first["metric"]
        table.at[index, "published"] = float(first["value"])
        table.at[index, "vs"] = metric
        protocol = first["protocol"]  # blank: NaN
        table.at[index, "source"] = (f"{first['source']} ({protocol})" if isinstance(protocol, str) and protocol
                                     else first["source"])
        ours = row.get(f"{metric}_mean")
        if ours is not None and ours == ours:
            table.at[index, "diff"] = round(float(ours) - float(first["value"]), 2)
    return table


def comparable_protocol(label, eval_kind: str) -> bool:
    """Whether a row's protocol (its table label) measures what a paper's number for the dataset does: not a
    superclass ACC (CIFAR-100's 20 superclasses), not clusters mapped to classes by majority (over-clustering,
    which scores higher the more clusters), not a head other than the chosen one (`selection=all-heads`), not k-means
    on a run's features (`assignment=kmeans`: each cluster number the papers give, and published.csv holds, is their
    trained head's), and not a `--cached_features` linear probe. (The split is not compared: EmbedUL publishes its
    ACC on the training split, which `eval_cluster.py --split train` scores; `source` names the paper's.)"""
    parts = str(label).split()
    return not ({"superclass", "mapping=majority", "selection=all-heads", "assignment=kmeans"} & set(parts)
                or (eval_kind == "linear" and cached_probe(label)))


def resumed_with_changes(settings) -> bool:
    """Whether a run (or a run its weights started from) was resumed with changed settings before the evaluated
    checkpoint (`settings_at`'s resume_changes: a larger --epochs, another precision...): no yardstick for a number
    published for a run trained as it was started."""
    return isinstance(settings, dict) and any(key.endswith("resume_changes") and value not in ("none", None)
                                              for key, value in settings.items())


def cached_probe(label) -> bool:
    """Whether a linear probe's protocol (its table label) is `--cached_features`: one linear layer on features of
    unaugmented images extracted once, another protocol than upstream's probes, which all train on augmented crops."""
    return "augmentation=cached" in str(label).split()


def published_names(dataset: str, protocol) -> set[str]:
    """The names published.csv may give a table row's dataset: its own, and for an image folder the folder's name
    (its protocol's `data=`, in lower case): ImageNet trained as `--dataset imagefolder --data_path .../imagenet`
    is recorded as imagefolder, and its rows meet the numbers published for imagenet."""
    names = {dataset}
    if dataset == "imagefolder":
        names |= {part.split("=", 1)[1].lower() for part in str(protocol).split() if part.startswith("data=")}
    return names


def published_for(published, datasets: set, methods: set):
    """The published rows of `datasets` (published_names of a table's rows) for the methods we have records of, to
    print under our table."""
    if published is None or published.empty:
        return None
    rows = published[published["dataset"].isin(datasets) & published["method"].isin(methods)]
    if rows.empty:
        return None
    columns = [c for c in ("method", "backbone", "epochs", "eval", "metric", "value", "protocol", "source")
               if c in rows]
    rows = rows[columns].astype(object).where(rows[columns].notna(), "")
    rows["epochs"] = rows["epochs"].map(_epochs_key)
    return rows


def _epochs_key(value) -> str:
    """'200' for 200, 200.0 or '200'; '' for none (a baseline: a blank CSV cell, NaN, or the table's '-')."""
    import pandas as pd

    if pd.isna(value) or value == "-":
        return ""
    try:
        return str(int(float(value)))
    except (TypeError, ValueError):
        return str(value)


def display_table(table):
    """Percentages with 2 decimals, `mean ± std` where n > 1, `(n=k)` after a value averaged over fewer runs than
    the row's n, `(mid-run)` after the epoch of a checkpoint in the middle of a longer run; empty columns
    dropped."""
    if table.empty:
        return table
    shown = table[[c for c in (*GROUP_COLUMNS, "protocol", "recipe") if c in table]].copy()
    if "mid_run" in table:  # a checkpoint of a longer run (its schedule not ended) is no finished run's result
        shown["epoch"] = [f"{epoch} (mid-run)" if mid else epoch
                          for epoch, mid in zip(shown["epoch"], table["mid_run"].fillna(False).astype(bool))]
    for metric in METRIC_COLUMNS:
        if f"{metric}_mean" not in table:
            continue
        cells = []
        counts = table[f"{metric}_n"] if f"{metric}_n" in table else table["n"]
        for mean, std, count, n in zip(table[f"{metric}_mean"], table[f"{metric}_std"], counts, table["n"]):
            if mean != mean or mean is None:
                cells.append("")
                continue
            cell = f"{mean:.2f} ± {std:.2f}" if count > 1 and std == std else f"{mean:.2f}"
            cells.append(cell if count == n else f"{cell} (n={count})")
        shown[metric] = cells
    shown["n"] = table["n"]
    if "revision" in table:
        shown["revision"] = table["revision"]
    for extra in ("published", "vs", "diff", "source"):
        if extra in table and table[extra].notna().any():  # numbers as written (84.9, -0.35) in every format
            shown[extra] = [value if isinstance(value, str) else "" if value is None or value != value
                            else str(float(value)) for value in table[extra]]
    return shown


# What a legend line below a 6-inch plot holds in 7-point text beside its marker.
LEGEND_LINE_CHARACTERS = 80


def plot_against_epochs(table, out_dir, dataset: str) -> list[Path]:
    """One PNG per metric: the metric against epochs, a line per (method, backbone, eval, protocol) and recipe (the
    runs' settings, on the flags all of them record, as the tables compare them). The legend names what tells the
    lines apart: the backbone where the table has several, the protocol's parts where a method's evaluation has
    several, the flags that differ between recipes. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .eval.plots import save_png

    numeric = table[table["epoch"].apply(lambda e: isinstance(e, (int, float)) and e == e)]
    written = []
    for metric in METRIC_COLUMNS:
        column = f"{metric}_mean"
        if column not in numeric or numeric[column].notna().sum() == 0:
            continue
        drawn = numeric[numeric[column].notna()]
        several_backbones = drawn["backbone"].nunique() > 1
        protocols = drawn.groupby(["method", "eval"])["protocol"].nunique()
        # A line per recipe: the runs' own settings, not the table's `recipe` column, which names a recipe only in
        # the rows whose epoch has runs of several; lines of runs of other recipes joined each other, and one
        # recipe's epochs were split over two lines.
        by_recipe = SETTINGS_KEY in drawn
        if by_recipe:
            # as the tables tell recipes apart (recipe_labels): by the flags every run of the line's group records;
            # a flag an older run lacks (or `world_size`, which settings_at adds before a resume) is no other recipe
            drawn = drawn.assign(**{SETTINGS_KEY: drawn[SETTINGS_KEY].fillna("")})
            drawn[SETTINGS_KEY] = drawn.groupby(["method", "backbone", "eval", "protocol"])[SETTINGS_KEY].transform(
                _on_common_keys)
        lines = ["method", "backbone", "eval", "protocol", *([SETTINGS_KEY] if by_recipe else
                                                             ["recipe"] if "recipe" in numeric else [])]
        recipe_names = {}  # (method, backbone, eval, protocol, settings key): the flags that tell it from the others
        if by_recipe:
            for group, same in drawn.groupby(lines[:4]):
                keys = sorted(set(same[SETTINGS_KEY]))
                labels = recipe_labels([json.loads(key) if key else None for key in keys]) or [""] * len(keys)
                recipe_names.update({(*group, key): label for key, label in zip(keys, labels)})
        # Of a protocol, the parts that tell it from the method's other protocols (`data=fm_4000 k=20`): an image
        # folder's whole protocol is some 170 characters, and the legend of such labels squeezed the axes away.
        distinct = {}
        for (method, kind), same in drawn.groupby(["method", "eval"]):
            distinct.update({(method, kind, protocol): part
                             for protocol, part in _distinct_parts(sorted(set(same["protocol"]))).items()})
        groups = list(drawn.groupby(lines))
        labels = []
        for method, backbone, kind, protocol, *recipe in (key for key, _ in groups):
            if by_recipe:
                recipe = [recipe_names.get((method, backbone, kind, protocol, *recipe), "")]
            label = " ".join([method, *([backbone] if several_backbones else []), kind,
                              *([distinct[(method, kind, protocol)]] if protocols[(method, kind)] > 1 else []),
                              *(r for r in recipe if isinstance(r, str) and r)])
            # a label wider than the figure was cut at both ends (the legend is centred below the axes)
            labels.append("\n".join(textwrap.wrap(label, LEGEND_LINE_CHARACTERS)))
        # the legend below the axes, a row per line of text (inside them it covered the points); past the colour
        # cycle's 10 lines the markers tell lines of one colour apart
        rows_of_text = sum(label.count("\n") + 1 for label in labels)
        figure, axes = plt.subplots(figsize=(6, 4 + 0.16 * rows_of_text), layout="constrained")
        for number, ((_, rows), label) in enumerate(zip(groups, labels)):
            rows = rows.sort_values("epoch")
            axes.errorbar(rows["epoch"], rows[column], yerr=rows[f"{metric}_std"].fillna(0),
                          marker="os^Dv"[number // 10 % 5], label=label, capsize=2)
        axes.set_xlabel("epochs")
        axes.set_ylabel(f"{metric} (%)")
        axes.set_title(f"{dataset}: {metric}")
        figure.legend(fontsize=7, loc="outside lower center")
        written.append(Path(out_dir) / f"{dataset}_{metric}.png")
        save_png(figure, written[-1], dpi=110)
    return written
