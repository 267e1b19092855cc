"""The programs a grid or recipe may name, with their parsers: flags are checked before anything is submitted."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..config import canonical_keys, check_alternatives, yaml_defaults
from ..errors import ConfigError
from ..programs import EVAL_PROGRAMS, PROGRAMS, TRAINING_PROGRAMS

__all__ = ["EVAL_PROGRAMS", "TRAINING_PROGRAMS", "canonical_layers", "check_eval_flags", "find_config",
           "program_parser", "reads_data_path", "to_argv", "trained_method", "training_program", "validate_flags"]


def find_config(config_file, source, label: str) -> Path:
    """The file a `config:` entry of the grid or recipe file `source` names (`label` starts the error message).

    An absolute path is taken as it is. A relative one is looked up in the current directory first (returned as
    given, so the run's config.yaml reads as the grid wrote it), then beside `source` and in every folder above it
    (returned absolute, so that jobs find it from any directory): `configs/swav_digits.yaml` in
    configs/grids/digits_smoke.yaml finds the repository's configs/ wherever launch.py starts, and nothing depends
    on where the package is installed.
    """
    if not isinstance(config_file, str) or not config_file:
        raise ConfigError(f"{label}: config {config_file!r} is not a file name (give the path of a YAML file)")
    path = Path(config_file)
    folders = [] if path.is_absolute() else Path(os.path.abspath(source)).parents
    for candidate in [path, *(folder / path for folder in folders)]:
        if candidate.is_file():
            return candidate
    where = "" if path.is_absolute() else f" (looked in the current directory, beside {str(source)!r} and above it)"
    raise ConfigError(f"{label}: config {str(config_file)!r} does not exist{where}")


def program_parser(name: str, values: dict) -> argparse.ArgumentParser:
    """The program's parser, with the flags of the method `values` names (main_pretrain, main_cluster)."""
    if name not in (*TRAINING_PROGRAMS, *EVAL_PROGRAMS):
        raise ConfigError(f"program {name!r} is not one of: {', '.join((*TRAINING_PROGRAMS, *EVAL_PROGRAMS))}")
    return PROGRAMS[name].parser(values)


def validate_flags(name: str, values: dict, source: str) -> dict:
    """Check that every key is a flag of the program with a value of the right type, and, for a training program,
    that it asks for no optimisation flag its optimiser and schedule do not read, as its own start checks
    (ConfigError naming it)."""
    parser = program_parser(name, values)
    given = yaml_defaults(parser, values, source)
    if name in TRAINING_PROGRAMS:
        from ..optim import refuse_unread_flags

        try:
            refuse_unread_flags(_namespace(parser, given), parser, "run")
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}") from None
    return given


def _namespace(parser: argparse.ArgumentParser, given: dict) -> argparse.Namespace:
    """The arguments `parser` would return for the flags `given` (checked values, keyed by destination)."""
    return argparse.Namespace(**{**{action.dest: action.default for action in parser._actions}, **given})


def check_eval_flags(program: str, flags: dict, method: str, source: str) -> None:
    """Refuse now what the evaluation `program` would refuse with `flags` once a run of `method` had trained (its
    `check_flags`: --assignment heads on a run without heads, a memory bank the method does not keep...), so that
    a grid does not find out hours after its training jobs started."""
    from ..methods import METHODS

    if flags.get("baseline"):
        raise ConfigError(f"{source}: {program} --baseline scores raw pixels, not a run: a grid's or recipe's "
                          f"evaluations score its runs (leave baseline out)")
    parser = program_parser(program, flags)
    given = yaml_defaults(parser, {**flags, "run": "x"}, source)  # validate_flags, on this parser
    try:
        PROGRAMS[program].load().check_flags(_namespace(parser, given), METHODS[method])
    except ConfigError as error:
        raise ConfigError(f"{source}: {program} {error}") from None


def reads_data_path(program: str, flags: dict) -> bool:
    """Whether a run of the training `program` with `flags` (resolved) reads --data_path: not on digits, which ship
    inside scikit-learn."""
    from ..data import DATASETS

    dataset = flags.get("dataset") or program_parser(program, flags).get_default("dataset")
    return dataset not in DATASETS or DATASETS[dataset].reads_files


def trained_method(program: str, flags: dict) -> str:
    """The method a training program trains with `flags` (resolved, as config layers merge them): theirs, or the
    program's default."""
    return flags.get("method") or program_parser(program, flags).get_default("method")


def canonical_layers(name: str, layers: list[tuple[str, dict]]) -> list[dict]:
    """Mappings of flag values, (source, values) in the order they override each other, each keyed by the flags'
    names (an alias such as low_dim renamed to embed_dim; two spellings of one flag in one mapping are refused), so
    that merging them lets a later mapping override an earlier one whatever spelling either uses. One mapping
    (a config file, or the flags of a grid or recipe: the job's one command line) naming both units of one length
    is refused, as the program refuses it (config.check_alternatives)."""
    parser = program_parser(name, {key: value for _, values in layers for key, value in values.items()})
    canonical = [canonical_keys(parser, values, source, known_only=False) for source, values in layers]
    for (source, _), values in zip(layers, canonical):
        check_alternatives(parser, set(values), source)
    return canonical


def training_program(values: dict, explicit: str | None, source: str) -> str:
    """The training program of a run whose flags are `values`: the one that trains its method (main_cluster.py for
    SeLa, Self-Classifier, EmbedUL, SCAN and its self-labelling: the methods whose program_kind is "cluster";
    main_pretrain.py for the others and when no method is named), so grids and
    recipes need not say it. An `explicit` program that does not train the method is refused."""
    from ..methods import METHODS

    method = values.get("method")
    derived = None
    if method is not None and method not in METHODS:
        raise ConfigError(f"{source}: method {method!r} is not one of: {', '.join(sorted(METHODS))}")
    if method in METHODS:
        derived = next(name for name in TRAINING_PROGRAMS
                       if PROGRAMS[name].program_kind == METHODS[method].program_kind)
    if explicit is not None and explicit not in TRAINING_PROGRAMS:
        raise ConfigError(f"{source}: program {explicit!r} is not one of: {', '.join(TRAINING_PROGRAMS)}")
    if explicit is not None and derived is not None and explicit != derived:
        raise ConfigError(f"{source}: method {method!r} trains with {derived}, not {explicit} (leave `program` out)")
    return explicit or derived or "main_pretrain.py"


def to_argv(values: dict) -> list[str]:
    """Flags as a command line: lists expand to several tokens, booleans to true/false, None is left out."""
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *(str(v) for v in value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv
