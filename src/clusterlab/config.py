"""Command lines built from defaults: `--config FILE` (YAML) sets defaults, explicit flags override them.

Every entry script describes its options once, as argparse arguments. A YAML file named with `--config` may set
any of them (its keys are the flags' names); a key that is not a flag is an error naming the key. A flag may have
aliases (the upstream spellings of the suite's common names: `--low_dim` for `--embed_dim`); a YAML key may be any
of them, and the value goes to the flag. One mapping that names a flag twice (`embed_dim` and `low_dim`) is refused;
across a `base:` chain, the file that inherits overrides its base whatever spelling either uses. The resolved
configuration, with the git commit (and whether the tree had uncommitted changes) and the software versions, is
written to the run directory as config.yaml, keyed by the flags' names (argparse's dest).
"""
from __future__ import annotations

import argparse
import copy
import difflib
import math
import os
import platform
import subprocess
import sys
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from .errors import ConfigError


def bool_flag(text: str) -> bool:
    """Parse on/off, true/false, yes/no, 1/0 (case-insensitive), as upstream's `bool_flag`."""
    lowered = str(text).lower()
    if lowered in {"1", "true", "on", "yes"}:
        return True
    if lowered in {"0", "false", "off", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean {text!r} (use true/false, on/off, yes/no or 1/0)")


def auto_or_bool(text: str) -> str | bool:
    """"auto" (the program decides), or a boolean as `bool_flag` reads it."""
    if str(text).lower() == "auto":
        return "auto"
    try:
        return bool_flag(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (use auto, true or false)") from None


def path(text: str) -> str:
    """A file or directory flag: an empty value (an unset shell variable) is refused, where it read as not given
    (a default run directory resumed, a second stage trained from scratch)."""
    text = str(text)  # a YAML number (output_dir: 2024) names a folder too
    if not text:
        raise argparse.ArgumentTypeError("'' is empty (give a path, or leave the flag out)")
    return text


def absolute_path(text: str) -> str:
    """`text` (a path flag's value, `~` expanded) made absolute from the working directory, as a run records its
    --data_path: an evaluation started elsewhere reads the same files."""
    return os.path.abspath(os.path.expanduser(text))


def positive_int(text: str) -> int:
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (use 1 or more)")
    return value


MAX_EPOCHS = 100_000  # far beyond any recipe (800 at most); 1e20 overflowed the steps' 64-bit count


def epoch_count(text: str) -> int:
    value = positive_int(text)
    if value > MAX_EPOCHS:
        raise argparse.ArgumentTypeError(f"{text!r} epochs is more than any run needs (use 1 to {MAX_EPOCHS:,})")
    return value


def non_negative_int(text: str) -> int:
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative (use 0 or more)")
    return value


def class_count(text: str, dataset_zero: bool = False) -> int:
    """A head's number of classes: one class is one answer for every image, nothing to learn (losses of 0). With
    `dataset_zero`, 0 stands for the dataset's number of classes."""
    if dataset_zero and _number(int, text) == 0:
        return 0
    return _two_or_more(text, "classes: a head", " (or 0: the dataset's)" if dataset_zero else "")


def cluster_count(text: str) -> int:
    """k-means' number of clusters: one cluster scores every image alike (NMI 0)."""
    return _two_or_more(text, "clusters: a clustering")


def prototype_count(text: str) -> int:
    """SwAV's prototypes: with one, every image has the same code and the loss is 0 (nothing learnt)."""
    return _two_or_more(text, "prototypes: a swapped prediction")


def _two_or_more(text: str, what: str, alternative: str = "") -> int:
    value = _number(int, text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r} {what} needs 2 or more{alternative}")
    return value


def class_count_or_dataset(text: str) -> int:
    return class_count(text, dataset_zero=True)


def seed(text: str) -> int:
    """A random seed every generator here takes (numpy's and scikit-learn's stop at 2^32 - 1)."""
    value = _number(int, text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed (use 0 to {MAX_SEED})")
    return value


MAX_SEED = 2 ** 32 - 1
FLOAT32_MAX = 3.4028234663852886e38


def finite_float(text: str) -> float:
    return _number(float, text)


def learning_rate(text: str) -> float:
    value = positive_float(text)  # 0 trains nothing, and the probe's record would score the untrained head
    if value > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is beyond float32's range (use at most {FLOAT32_MAX:.4g})")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number (use a value above 0)")
    return value


def area_fraction(text: str) -> float:
    """A crop's share of the image's area: above 1 no crop fits (each was the fallback crop, without a word)."""
    return _share(text, "a share of the image's area")


def fraction(text: str) -> float:
    """A part of a whole: above 0, at most 1."""
    return _share(text, "a fraction")


def _share(text: str, what: str) -> float:
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what} (use a value above 0, at most 1)")
    return value


def probability(text: str) -> float:
    value = _number(float, text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability (use a value from 0 to 1)")
    return value


def non_negative_float(text: str) -> float:
    value = _number(float, text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative (use 0 or more)")
    return value


def _number(kind, text):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        wanted = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r} (give {wanted})") from None
    if not math.isfinite(value):  # records are JSON, which has no inf or nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


INT_TYPES = (int, positive_int, non_negative_int, epoch_count, seed, class_count, cluster_count, class_count_or_dataset,
             prototype_count)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show every flag's default in --help, also for flags declared without a help text (argparse skips those)."""

    def _format_action(self, action):
        if not action.help and action.option_strings:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        """A help text that says its default in words (`default: the dataset's`) is not followed by the value that
        stands for it (`(default: None)`); a value a config file gives is shown."""
        if "(default:" in (action.help or "") and (action.default is None or action.default == []):
            return action.help
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block) and exits with status 2; an unknown
    flag is followed by what was probably meant (unknown_flag_hint)."""

    # What to say of an unknown flag that other methods take (programs that train set it: their flags depend on
    # --method); asked only when a flag is unknown.
    other_methods_hint: Callable[[str], str | None] = staticmethod(lambda name: None)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            flag = next((token for token in extras if token.startswith("--") and token != "--"), None)
            hint = unknown_flag_hint(self, flag[2:].split("=", 1)[0]) if flag else ""
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


# Upstream flags that no alias keeps because ours says the opposite.
INVERTED_FLAGS = {"train_heads": "EmbedUL's --train_heads is the opposite of --freeze_heads here: give --freeze_heads "
                                 "false to train the heads"}


def unknown_flag_hint(parser: argparse.ArgumentParser, name: str) -> str:
    """What to add to the refusal of an unknown flag or YAML key `name`: the other methods that take it, or the
    flag of this program whose name is closest (a typo), or where to look."""
    hint = getattr(parser, "other_methods_hint", lambda _: None)(name)
    if hint:
        return f" ({hint})"
    if name == "config":  # only a YAML key can name it here: --config itself is a flag
        return " (a config file names the one it builds on with `base: OTHER.yaml`)"
    if name in INVERTED_FLAGS:
        return f" ({INVERTED_FLAGS[name]})"
    close = difflib.get_close_matches(name, list(flag_actions(parser)), n=1, cutoff=0.75)
    return f" (did you mean --{close[0]}?)" if close else f" (not a flag of {parser.prog}; see --help)"


def new_parser(description: str, prog: str | None = None) -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog=prog, description=description, formatter_class=DefaultsHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--config", type=path, default=None, help="YAML file whose keys set this program's defaults")
    return parser


def _coerce(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """Check a YAML value against the flag's type, so a wrong type fails before anything runs. Null stands for a
    flag's default only where that default is None (elsewhere it would reach the program as None)."""
    if value is None:
        if action.default is None:
            return None
        raise ConfigError(f"{source}: key {key!r} is null; give it a value, or leave it out for its default "
                          f"({action.default!r})")
    if action.nargs == "+" and isinstance(value, (list, tuple)) and not value:
        raise ConfigError(f"{source}: key {key!r} is an empty list; give it at least one value")
    # A flag without a type takes text on the command line, so its YAML value must be one scalar as well.
    kind = action.type or (str if isinstance(action, argparse._StoreAction) else None)
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        kind = bool_flag
    try:
        if action.nargs in ("+", "*") or isinstance(action.default, list):
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_convert(kind, v) for v in items]
        converted = _convert(kind, value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise ConfigError(f"{source}: key {key!r} has the invalid value {value!r} ({err})") from None
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        # (`amp: off` is YAML's false: the value named would be one the file never spells)
        meant = [word for word in (("on", "yes") if value is True else ("off", "no")) if word in action.choices]
        unquoted = (f" (YAML reads an unquoted {meant[0]} as {value}: write '{meant[0]}' in quotes)"
                    if isinstance(value, bool) and meant else "")
        raise ConfigError(f"{source}: key {key!r} = {converted!r} is not one of: {choices}{unquoted}")
    return converted


def _convert(kind, value: Any) -> Any:
    if kind is None:
        return value
    if isinstance(value, (list, dict)):
        raise TypeError(f"expected one value, got {type(value).__name__}")
    # int(2.5) is 2 and float(True) is 1.0: a YAML number or boolean must already be what the flag takes. Every flag
    # type but the boolean ones and the text ones reads a number (probabilities, ranges and fractions included).
    if isinstance(value, bool) and kind not in (bool_flag, auto_or_bool, str, path):
        raise TypeError(f"expected a number, got the boolean {value}")
    if kind in INT_TYPES and isinstance(value, float) and not value.is_integer():
        raise TypeError(f"expected an integer, got {value}")
    return kind(value)


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every key that may name a flag of `parser`: its name (dest) and each of its option strings without the
    dashes (so `low_dim`, an alias of --embed_dim, names that flag too)."""
    actions = {}
    for action in parser._actions:
        if action.dest in ("help", "config"):
            continue
        for key in (action.dest, *(option.lstrip("-") for option in action.option_strings)):
            actions[key] = action
    return actions


def canonical_keys(parser: argparse.ArgumentParser, values: dict, source: str, known_only: bool = True) -> dict:
    """`values` keyed by the flags' names: an alias key is renamed to its flag's dest. A key that names no flag is
    an error (`known_only`) or kept as it is; two keys naming one flag are an error."""
    actions = flag_actions(parser)
    for key in values:
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} ({type(key).__name__}) names no flag: YAML reads an unquoted "
                              f"number, null, true/false, yes/no or on/off as such; flag names are text")
    unknown = sorted(set(values) - set(actions))
    if unknown and known_only:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}{unknown_flag_hint(parser, unknown[0])}")
    out, spelled = {}, {}
    for key, value in values.items():
        dest = actions[key].dest if key in actions else key
        if dest in spelled:
            raise ConfigError(f"{source}: keys {spelled[dest]!r} and {key!r} both set --{dest} (one spelling is an "
                              f"alias of the other); keep one")
        spelled[dest], out[dest] = key, value
    return out


def yaml_defaults(parser: argparse.ArgumentParser, values: dict, source: str) -> dict:
    """Validate a mapping of flag names (or aliases) to values against `parser`; returns it keyed by the flags'
    names, coerced to their types."""
    values = canonical_keys(parser, values, source)
    actions = flag_actions(parser)
    return {key: _coerce(actions[key], key, value, source) for key, value in values.items()}


def declare_alternatives(parser: argparse.ArgumentParser, *dests: str) -> None:
    """Flags that give one length in different units (iterations, and epochs that replace them when set): a layer
    (a config file, then the command line) that names some of them resets the others to their own defaults, so
    the one named last wins, as any flag named later does."""
    parser.__dict__.setdefault("alternatives", []).append(dests)


def check_alternatives(parser: argparse.ArgumentParser, named: set, source: str) -> None:
    """Refuse one layer (a config file, a command line: a grid job's flags) naming two alternatives of one length
    (declare_alternatives): neither is named after the other there."""
    for dests in getattr(parser, "alternatives", []):
        both = sorted(named & set(dests))
        if len(both) > 1:
            raise ConfigError(f"{source}: {' and '.join(f'--{dest}' for dest in both)} give one length in different "
                              f"units; name one of them")


def replaced_alternatives(parser: argparse.ArgumentParser, named: set) -> list[str]:
    """The flags a layer naming `named` replaces: the other units of each length it gives (declare_alternatives)."""
    return [dest for dests in getattr(parser, "alternatives", []) if named & set(dests)
            for dest in dests if dest not in named]


def _without_replaced(parser: argparse.ArgumentParser, named: set, values: dict, originals: dict,
                      source: str) -> None:
    """Reset in `values` each alternative of a flag in `named` that `named` does not hold (declare_alternatives)."""
    check_alternatives(parser, named, source)
    values.update({dest: originals[dest] for dest in replaced_alternatives(parser, named)})


def _declared_defaults(parser: argparse.ArgumentParser) -> dict:
    """Each flag's default as its add_argument declared it (before a config file's values are set as defaults)."""
    return {action.dest: action.default for action in parser._actions}


def merged_defaults(parser: argparse.ArgumentParser, layers: list[tuple[str, dict]]) -> dict:
    """Mappings of flag values (source, values), each validated on its own, merged in order: a later one overrides
    an earlier one whatever spelling either uses (and the alternatives of what it names, declare_alternatives)."""
    originals = _declared_defaults(parser)
    merged = {}
    for source, values in layers:
        layer = yaml_defaults(parser, values, source)
        _without_replaced(parser, set(layer), merged, originals, source)
        merged.update(layer)
    return merged


def load_yaml(path: str | os.PathLike, kind: str = "config", example: str = "configs/swav_digits.yaml") -> dict:
    """The mapping a YAML file holds; `kind` and `example` name the sort of file in the errors (a grid, recipes)."""
    path = Path(path)
    label = f"{kind} file {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{label} is a folder (give a YAML file, e.g. {example})")
    if not path.is_file():
        where = "" if path.is_absolute() else f" (a relative path: read from the current directory, {os.getcwd()})"
        raise ConfigError(f"{label} does not exist{where}")
    data = _parse_yaml(path, label) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must hold a mapping of " + ("flag names to values" if kind == "config" else
                                                                 "keys to values"))
    return data


def config_layers(path: str | os.PathLike, _chain: tuple = ()) -> list[tuple[str, dict]]:
    """The files of a config as (file name, values), the deepest `base:` first; each file's `base: OTHER.yaml`
    (relative to the file) is read before it and overridden by it.

    This keeps recipe variants (Un-Mix on top of SwAV, a `_queue` variant) to the lines that differ.
    """
    path = Path(path)
    values = load_yaml(path)
    base = values.pop("base", None)
    if base is None:
        return [(str(path), values)]
    base_path = (path.parent / str(base)).resolve()
    if base_path in _chain or base_path == path.resolve():
        raise ConfigError(f"config file {str(path)!r}: `base: {base}` makes a cycle")
    return [*config_layers(base_path, (*_chain, path.resolve())), (str(path), values)]


def parse(parser: argparse.ArgumentParser, argv: Iterable[str] | None = None,
          extend: Callable[[argparse.ArgumentParser, dict], None] | None = None) -> argparse.Namespace:
    """Parse `argv` with the YAML file of `--config` as defaults.

    `extend(parser, partial)` may add arguments that depend on a first look at the command line and the YAML file
    (the method's own flags depend on `--method`); `partial` holds the values known so far.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _bare_switches(parser)
    first = _first_look(parser, argv)
    layers = config_layers(first.config) if first.config else []
    file_values = {key: value for _, values in layers for key, value in values.items()}
    if extend is not None:
        partial = {**vars(first), **file_values}
        for flag in ("method",):
            explicit = _explicit_value(argv, flag)
            if explicit is not None:
                partial[flag] = explicit
        extend(parser, partial)
        _bare_switches(parser)
    originals = _declared_defaults(parser)
    parser.set_defaults(**merged_defaults(parser, layers))
    args = parser.parse_args(argv)
    if getattr(parser, "alternatives", None):
        on_command_line = {action.dest for action in parser._actions
                           if any(_explicit_value(argv, option.lstrip("-")) is not None
                                  for option in action.option_strings if option.startswith("--"))}
        _without_replaced(parser, on_command_line, vars(args), originals, "the command line")
    return args


def _bare_switches(parser: argparse.ArgumentParser) -> None:
    """Every true/false flag also stands alone for true (`--plot` as `--plot true`), as some were declared and
    others not: a bare `--sync_bn` failed with 'expected one argument' where a bare `--compile` worked."""
    for action in parser._actions:
        if action.type is bool_flag and action.nargs is None:
            action.nargs, action.const = "?", True


def _first_look(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The values known before the YAML file and the method's flags are read: a required flag may still be missing
    (it is named by the full parse, or `--help` shows it), and `--help` waits for the full parser."""
    required = [action for action in parser._actions if action.required]
    for action in required:
        action.required = False
    try:
        first, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    finally:
        for action in required:
            action.required = True
    return first


def _explicit_value(argv: list[str], flag: str) -> str | None:
    """The value of the last `--flag` in `argv` (argparse keeps the last of a flag given twice)."""
    value = None
    for i, token in enumerate(argv):
        if token == f"--{flag}" and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith(f"--{flag}="):
            value = token.split("=", 1)[1]
    return value


def source_checkout() -> Path | None:
    """The folder this package is imported from as its src/clusterlab (a repository's checkout); None for an
    installed copy (site-packages/clusterlab)."""
    package = Path(__file__).resolve().parent
    root = package.parents[1]
    return root if package == root / "src" / "clusterlab" else None


# What counts as the code in a checkout: everything tracked but results/, which the result scripts rewrite (a table
# regenerated by one script does not make the next script's runs dirty), except the published numbers the tables
# read. Two pathspecs, as git's exclusion wins over any inclusion. scripts/lib/runs.sh checks the same paths.
CODE_PATHS = ((".", ":(exclude)results"), ("results/published.csv",))


def git_state() -> dict:
    """{"git_commit": HEAD of the git checkout this package is imported from, "git_dirty": whether its tracked files
    outside results/ differ from HEAD}; both None where the package is not a checkout's src/clusterlab (an installed
    copy: a git repository around site-packages is not where the code came from) or git cannot say."""
    root = source_checkout()
    unknown = {"git_commit": None, "git_dirty": None}
    if root is None:
        return unknown

    def git(*args: str) -> str | None:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != root:
            return unknown
        commit = git("rev-parse", "HEAD")
        changes = [git("status", "--porcelain", "--untracked-files=no", "--", *paths) for paths in CODE_PATHS]
    except (OSError, subprocess.SubprocessError):
        return unknown
    if not commit or None in changes:
        return unknown
    return {"git_commit": commit, "git_dirty": any(changes)}


def recorded_git_state(record: dict) -> dict:
    """git_commit and git_dirty of a config.yaml or metrics record, also from runs written before the two were
    separate fields (a commit with a "-dirty" suffix, "unknown"); None where the record does not say."""
    commit, dirty = record.get("git_commit"), record.get("git_dirty")
    if not isinstance(commit, str) or not commit or commit == "unknown":
        return {"git_commit": None, "git_dirty": None}
    if "git_dirty" not in record:
        dirty = commit.endswith("-dirty")
        commit = commit.removesuffix("-dirty")
    return {"git_commit": commit, "git_dirty": dirty if isinstance(dirty, bool) else None}


def starts_of(run_dir: str | os.PathLike, state: dict) -> list[dict]:
    """The git states of the code that trained a checkpoint (`state`, of the run in `run_dir`): the list it keeps
    (`trained_by`, one entry per start whose state differed from the start before); for a checkpoint written before
    it kept one, what that run's config.yaml says of its last start, or one unknown state."""
    if isinstance(state.get("trained_by"), list):
        return list(state["trained_by"])
    return [recorded_git_state(written_run_config(run_dir) or {})]


def written_run_config(run_dir: str | os.PathLike) -> dict | None:
    """RUN/config.yaml as written, whole (None where there is none; {} for one that cannot be read)."""
    path = Path(run_dir) / "config.yaml"
    if not os.path.lexists(path):  # (a folder in its place, a link to nowhere: one that cannot be read)
        return None
    try:
        # libyaml's parser where PyYAML has it: the tables read every run's config.yaml, several times faster
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def software_versions() -> dict:
    import numpy
    import torch
    import torchvision

    versions = {"python": platform.python_version(), "torch": str(torch.__version__),
                "torchvision": str(torchvision.__version__), "numpy": str(numpy.__version__)}
    for name in ("sklearn", "scipy", "submitit", "pandas"):
        try:
            versions[name] = str(__import__(name).__version__)
        except ImportError:
            pass
    return versions


def write_resolved(args: argparse.Namespace, run_dir: str | os.PathLike, program: str, git: dict | None = None,
                   **resolved) -> None:
    """Write config.yaml: every flag's resolved value, what the flags resolved to where they leave a choice (e.g.
    the precision that really ran), plus where and with what (`git`: the code's state, by default asked now) it ran."""
    from .checkpoint import atomic_write_text

    record = {"program": program, "args": _plain(vars(args)), **resolved, **(git or git_state()),
              "versions": software_versions(), "host": platform.node()}
    atomic_write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(record, sort_keys=False))


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error (YAML keeps the last,
    silently: `epochs: 1` then `epochs: 2` trained 2). Each mapping is checked once, as written: a mapping merged
    into another (`<<: *anchor`) is rewritten in place with the keys it merged itself, which may override."""

    def flatten_mapping(self, node):
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: the mapping's own keys override it
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # a list or mapping as a key: construct_mapping refuses it
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and "
                                    f"{key_node.start_mark.line + 1}); keep one")  # (its lines said: no mark)
                seen[key] = key_node.start_mark.line
        super().flatten_mapping(node)


def _parse_yaml(path: Path, named: str):
    """The YAML document of `path`; one ConfigError naming it (`named`) when it is not YAML (or not UTF-8 text), or
    gives a key twice in one mapping."""
    try:
        return yaml.load(path.read_bytes(), Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        # the problem and where, not only the parser's state (`while parsing a flow sequence`)
        where = (f" at line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1}"
                 if err.problem_mark is not None else "")
        context = f", {err.context}" if err.context else ""
        raise ConfigError(f"{named} is not valid YAML ({err.problem or 'unreadable'}{where}{context})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{named} is not valid YAML ({str(err).splitlines()[0]})") from None


def read_run_config(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"run directory {str(run_dir)!r} has no config.yaml (not a clusterlab run?)")
    data = _parse_yaml(path, str(path))
    if not isinstance(data, dict) or not isinstance(data.get("args"), dict):
        raise ConfigError(f"{path} is not a clusterlab run config (no mapping of flags under `args`)")
    return data["args"]


def _plain(values: dict) -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, Path):
            value = str(value)
        out[key] = value
    return out
