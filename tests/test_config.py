"""Command lines built from YAML defaults (config.py): flags override the file, a bad key or value is one line that
names it, --help shows every flag's default, and config.yaml in the run directory records the resolved run. The
common flag names and their upstream spellings (aliases): on the command line, in YAML files, across `base:` files
and grids, and in the records of runs trained before the rename."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy
import pytest
import torch
import yaml

from clusterlab import config
from clusterlab.data import registry
from clusterlab.errors import ConfigError
from conftest import CONFIG, PYTHON, ROOT, TINY, TINY_RUN, assert_ok, copy_run, entry_module

pretrain = entry_module("main_pretrain")


def write_yaml(tmp_path, values: dict, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return str(path)


def full_parser() -> argparse.ArgumentParser:
    parser = pretrain.get_args_parser()
    pretrain.add_method_args(parser, {"method": "swav"})
    return parser


def test_yaml_sets_defaults_and_flags_override(tmp_path):
    path = write_yaml(tmp_path, {"width": 4, "lr": 0.5, "epsilon": 0.02, "nmb_crops": [2, 4], "nesterov": "on",
                                 "optimizer": "sgd"})
    args = pretrain.parse_args(["--config", path, "--width", "8", "--nmb_crops", "3"])
    assert args.width == 8 and args.nmb_crops == [3]                    # the flags win
    assert args.lr == 0.5 and args.optimizer == "sgd"                   # the file beats swav's own defaults
    assert args.epsilon == 0.02 and args.nesterov is True               # a method flag from the file, converted
    assert args.sinkhorn_iterations == 3 and args.batch_size == 256    # neither: the parser's defaults
    assert args.output_dir == "runs/swav_digits"


def test_method_defaults_apply_without_a_file():
    args = pretrain.parse_args([])
    assert (args.method, args.optimizer, args.lr, args.nmb_prototypes) == ("swav", "lars", 4.8, 3000)


@pytest.mark.parametrize("values, key", [
    ({"bogus_key": 1}, "bogus_key"),
    ({"width": 4, "learning_rate": 0.1}, "learning_rate"),
    ({"config": "other.yaml"}, "config"),
])
def test_unknown_key_is_refused_by_name(tmp_path, values, key):
    path = write_yaml(tmp_path, values)
    with pytest.raises(ConfigError) as caught:
        pretrain.parse_args(["--config", path])
    message = str(caught.value)
    assert f"unknown key {key!r}" in message and path in message and "\n" not in message


@pytest.mark.parametrize("key, value, words", [
    ("width", [1, 2], "expected one value, got list"),       # a list for an int
    ("lr", "abc", "invalid float value: 'abc' (give a number)"),             # a string for a float
    ("epochs", 2.5, "expected an integer, got 2.5"),         # int(2.5) would silently be 2
    ("width", True, "expected a number"),                    # int(True) would silently be 1
    ("lr", False, "expected a number"),
    ("grey_p", [True], "expected a number"),                 # a probability: float(True) would silently be 1.0
    ("hue", False, "expected a number"),                     # a range of its own type
    ("optimizer", "adamw", "is not one of: sgd, lars, adam"),  # a bad choice
    ("amp", False, "YAML reads an unquoted off as False: write 'off' in quotes"),  # `amp: off`
    ("nesterov", "maybe", "invalid boolean 'maybe'"),
    ("arch", ["a", "b"], "expected one value, got list"),    # a flag without a type takes one string
    ("nmb_crops", [2, "x"], "'x'"),                        # one bad item of a list flag
    ("batch_size", 0, "is not a positive integer"),          # the flag's own range check applies to the file too
    ("nmb_prototypes", {"a": 1}, "expected one value, got dict"),
    ("epochs", None, "is null; give it a value"),           # null would reach the program as None
    ("nesterov", None, "is null"),
    ("nmb_crops", [], "is an empty list"),                   # a flag that takes one value or more
    ("lr", float("inf"), "not a finite number"),             # records are JSON: no inf
    ("mean", [float("nan")], "not a finite number"),         # a plain float flag too
])
def test_wrong_type_is_refused_naming_the_key(tmp_path, key, value, words):
    path = write_yaml(tmp_path, {key: value})
    with pytest.raises(ConfigError) as caught:
        pretrain.parse_args(["--config", path])
    message = str(caught.value)
    assert f"key {key!r}" in message and words in message and "\n" not in message


@pytest.mark.parametrize("text, problem", [
    # the problem and where it is, not only the parser's state
    ("a: [1", r"is not valid YAML \(expected ',' or '\]', but got '<stream end>' at line 1, column 6, while parsing "
              r"a flow sequence\)"),
    ("lr: 0.1\n\tepochs: 2\n", r"found character '\\t' that cannot start any token at line 2, column 1"),
    # keys YAML reads as other types than text: a traceback in difflib before
    ("1: 2\n", r"key 1 \(int\) names no flag: YAML reads an unquoted number"),
    ("config: other.yaml\n", r"unknown key 'config' \(a config file names the one it builds on with `base: "
                             r"OTHER.yaml`\)"),
    ("on: true\nlr: 0.1\n", r"key True \(bool\) names no flag"),
    ("- 1\n- 2\n", "must hold a mapping"),
    # YAML itself keeps the last of two equal keys: `epochs: 1` then `epochs: 2` trained 2 epochs
    ("epochs: 1\nlr: 0.1\nepochs: 2\n", r"key 'epochs' appears twice \(lines 1 and 3\); keep one\)$"),
    ("hidden_dim: 8\ndefaults: &d {lr: 0.1}\nnested: {<<: *d, lr: 0.2, lr: 0.3}\n", "key 'lr' appears twice"),
])
def test_malformed_file_is_refused(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        pretrain.parse_args(["--config", str(path)])


@pytest.mark.parametrize("text, key, expected", [
    ("defaults: &d {x: 1, y: 2}\nmapping: {<<: *d, x: 3}\n", "mapping", {"x": 3, "y": 2}),
    # an anchored mapping that merges and overrides, merged before it is built: PyYAML rewrites it in place
    ("base: &base {epochs: 1}\na:\n  x: &mid\n    <<: *base\n    epochs: 2\nb:\n  <<: *mid\n", "b", {"epochs": 2}),
])
def test_a_merge_key_is_overridden_without_counting_as_a_duplicate(tmp_path, text, key, expected):
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    assert config.load_yaml(path)[key] == expected


def test_a_list_as_a_key_is_one_line(tmp_path):
    path = tmp_path / "key.yaml"
    path.write_text("? [1, 2]\n: a\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        config.load_yaml(path)


@pytest.mark.parametrize("text", [b"args: [1", b"args:\n  method: swav\xff\n"])
def test_a_run_config_that_is_not_yaml_is_refused_on_one_line(tmp_path, text):
    (tmp_path / "config.yaml").write_bytes(text)
    with pytest.raises(ConfigError, match="config.yaml is not valid YAML") as caught:
        config.read_run_config(tmp_path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("text", ["program: x\n", "args:\n", "args: [1, 2]\n", "- 1\n"])
def test_a_run_config_without_a_mapping_of_flags_is_refused_on_one_line(tmp_path, text):
    """`args: null` or a list gave an AttributeError traceback in every evaluation."""
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"config.yaml is not a clusterlab run config \(no mapping of flags"):
        config.read_run_config(tmp_path)


def test_a_config_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"epochs: 3\nmethod: swav\xff\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        pretrain.parse_args(["--config", str(path)])


@pytest.mark.parametrize("program, argv, method, flag", [
    ("main_pretrain", ["--method", "swav", "--method", "npid"], "npid", "nce_k"),
    ("main_cluster", ["--method", "sela", "--method=scan"], "scan", "num_neighbours")])
def test_a_method_given_twice_is_the_last_as_for_any_flag(program, argv, method, flag):
    """The first --method's flags were added while argparse kept the last: a traceback for a missing attribute."""
    args = entry_module(program).parse_args(argv)
    assert args.method == method and hasattr(args, flag)


def test_a_path_given_as_a_yaml_number_is_text(tmp_path):
    """`output_dir: 2024` names a folder: it reached the program as the int 2024 (a traceback) once path flags had a
    type of their own."""
    (tmp_path / "c.yaml").write_text("output_dir: 2024\ndata_path: 7\n")
    args = pretrain.parse_args(["--config", str(tmp_path / "c.yaml")])
    assert (args.output_dir, args.data_path) == ("2024", os.path.abspath("7"))  # (recorded absolute)


def test_missing_config_file_is_refused(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist$"):
        pretrain.parse_args(["--config", str(tmp_path / "nope.yaml")])
    monkeypatch.chdir(tmp_path)  # a recipe path from the repository, run elsewhere: where it looked is said
    with pytest.raises(ConfigError, match=r"^config file 'configs/swav_digits.yaml' does not exist \(a relative path: "
                                          f"read from the current directory, {tmp_path}\\)$"):
        pretrain.parse_args(["--config", "configs/swav_digits.yaml"])


@pytest.mark.parametrize("module, argv, words", [
    ("main_pretrain", ["--batch_size", "0"], ["--batch_size", "'0'", "positive integer"]),
    ("main_pretrain", ["--epochs", "-1"], ["--epochs", "'-1'", "positive integer"]),
    ("main_pretrain", ["--lr", "-0.1"], ["--lr", "'-0.1'", "not a positive number"]),
    ("main_pretrain", ["--log_every", "0"], ["--log_every", "'0'"]),
    ("main_pretrain", ["--width", "0"], ["--width", "'0'"]),
    ("main_pretrain", ["--width", "four"], ["--width", "invalid int value: 'four' (give a whole number)"]),
    ("eval_cluster", ["--clusters", "10.5"], ["--clusters", "invalid int value: '10.5' (give a whole number)"]),
    ("eval_knn", ["--k", "0"], ["--k", "'0'"]),
    ("eval_knn", ["--temperature", "0"], ["--temperature", "'0'", "positive number"]),
    ("eval_knn", ["--temperature", "inf"], ["--temperature", "'inf'", "not a finite number"]),
    ("eval_cluster", ["--clusters", "10", "0"], ["--clusters", "'0'"]),
    ("eval_cluster", ["--restarts", "0"], ["--restarts", "'0'"]),
    ("collect_results", ["--plots", "maybe"], ["--plots", "'maybe'"]),
    ("main_pretrain", ["--lars_trust", "-0.001"], ["--lars_trust", "'-0.001'", "positive number"]),
    # every sample an anchor at the first round (min(N, N x 3))
    ("main_pretrain", ["--method", "superand", "--ans_select_rate", "3"], ["--ans_select_rate", "'3'", "fraction"]),
    ("eval_linear", ["--log_every", "0"], ["--log_every", "'0'", "positive integer"]),
    # an empty path (an unset shell variable) read as not given: the default run resumed, a stage trained from scratch
    ("main_pretrain", ["--output_dir", ""], ["--output_dir", "'' is empty"]),
    ("main_cluster", ["--method", "embedul", "--pretrained", ""], ["--pretrained", "'' is empty"]),
    ("eval_knn", ["--run", "runs/x", "--checkpoint", ""], ["--checkpoint", "'' is empty"]),
    ("collect_results", ["--out", ""], ["--out", "'' is empty"]),
    ("launch", ["--output_root", ""], ["--output_root", "'' is empty"]),
])
def test_out_of_range_flag_is_one_line(capsys, module, argv, words):
    entry = entry_module(module)
    parser = entry.get_args_parser()
    with pytest.raises(SystemExit) as caught:
        config.parse(parser, argv, extend=getattr(entry, "add_method_args", None))
    assert caught.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{module}.py: error: argument ")
    for word in words:
        assert word in lines[0]


def help_blocks(text: str) -> dict:
    """{--flag: the help text printed for it} from argparse's --help output."""
    blocks = {}
    for block in re.split(r"\n(?=  -)", text):
        match = re.match(r"\s+(?:-\w, )?(--\w+)", block)
        if match:
            blocks[match.group(1)] = " ".join(block.split())
    return blocks


def flags_of(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"]


def test_pretrain_help_lists_every_flag_with_its_default(tmp_path):
    path = write_yaml(tmp_path, {"epochs": 7, "nmb_prototypes": 33, "mean": [0.25]})
    result = subprocess.run([PYTHON, str(ROOT / "main_pretrain.py"), "--config", path, "--method",
                             "swav", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_ok(result)
    blocks = help_blocks(result.stdout)
    expected = flags_of(full_parser())
    assert "--nmb_prototypes" in expected and "--epsilon" in expected and "--queue_length" in expected
    missing = [f for f in expected if f not in blocks]
    # once (--mean, below: in words, then the file's value)
    no_default = [f for f in expected if f in blocks and f != "--mean" and blocks[f].count("(default") != 1]
    assert not missing and not no_default, (missing, no_default)
    assert "\nswav:\n" in result.stdout
    # The YAML file's values are the defaults shown.
    assert "(default: 7)" in blocks["--epochs"] and "(default: 33)" in blocks["--nmb_prototypes"]
    # a default said in words, then the value the file gives
    assert "(default: the dataset's) (default: [0.25])" in " ".join(blocks["--mean"].split())
    assert "(default: 0.05)" in blocks["--epsilon"]


@pytest.mark.parametrize("module", ["eval_knn", "eval_cluster", "collect_results"])
def test_eval_help_lists_every_flag_with_its_default(module):
    parser = entry_module(module).get_args_parser()
    blocks = help_blocks(parser.format_help())
    # once: a help text that says its default in words is not followed by the value standing for it, `(default: None)`
    assert all(blocks.get(flag, "").count("(default") == 1 for flag in flags_of(parser)), blocks


def test_run_config_records_every_resolved_flag_commit_and_versions(tiny_run):
    recorded = yaml.safe_load((tiny_run / "config.yaml").read_text())
    argv = [*TINY, *TINY_RUN, "--output_dir", str(tiny_run)]
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(pretrain.parse_args(argv)).items()}
    assert recorded["program"] == "main_pretrain.py"
    assert recorded["args"] == expected
    assert set(recorded["args"]) == {a.dest for a in full_parser()._actions if a.dest != "help"}
    assert recorded["args"]["config"] == CONFIG and recorded["args"]["width"] == 4
    # what the data held (data_path differs per machine): the tables tell runs of two image folders apart by it
    train = registry.load("digits", "train")
    assert recorded["training_set"] == {"images": len(train), "fingerprint": train.fingerprint}
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    changes = "".join(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--",
                                      *paths], capture_output=True, text=True).stdout for paths in config.CODE_PATHS)
    assert recorded["git_commit"] == head and recorded["git_dirty"] is bool(changes)
    versions = recorded["versions"]
    assert versions["torch"] == str(torch.__version__) and versions["numpy"] == numpy.__version__
    assert versions["python"] == config.platform.python_version()



def git_state_of_copy(src: Path) -> dict:
    """config.git_state() as the package copy under `src` (a folder holding clusterlab/) reports it."""
    done = subprocess.run([PYTHON, "-c", "import json; from clusterlab.config import git_state; "
                                         "print(json.dumps(git_state()))"],
                          env={**os.environ, "PYTHONPATH": str(src)}, cwd=src, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_git_state_is_the_checkouts_commit_and_whether_tracked_files_changed(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "src" / "clusterlab", repo / "src" / "clusterlab",
                    ignore=shutil.ignore_patterns("__pycache__"))

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout.strip()

    # Outside any git checkout (an installed copy): unknown.
    assert git_state_of_copy(repo / "src") == {"git_commit": None, "git_dirty": None}
    git("init", "-q")
    git("add", "src")
    git("commit", "-q", "-m", "x")
    head = git("rev-parse", "HEAD")
    assert git_state_of_copy(repo / "src") == {"git_commit": head, "git_dirty": False}
    (repo / "notes.txt").write_text("untracked files do not make the tree dirty\n")
    assert git_state_of_copy(repo / "src") == {"git_commit": head, "git_dirty": False}
    def commit_then_change(name: str, committed: str, changed: str) -> str:
        """Commit results/NAME as `committed`, then rewrite it as `changed`; the commit made."""
        (repo / "results").mkdir(exist_ok=True)
        (repo / "results" / name).write_text(committed)
        git("add", "results")
        git("commit", "-q", "-m", name)
        (repo / "results" / name).write_text(changed)
        return git("rev-parse", "HEAD")

    # results/ is what the result scripts rewrite, not code: a regenerated table leaves the runs clean
    head = commit_then_change("table.md", "| a |\n", "| b |\n")
    assert git_state_of_copy(repo / "src") == {"git_commit": head, "git_dirty": False}
    # ... but the published numbers the tables read are an input
    head = commit_then_change("published.csv", "method\n", "method\nswav\n")
    assert git_state_of_copy(repo / "src") == {"git_commit": head, "git_dirty": True}
    git("checkout", "-q", "--", "results/published.csv")
    with open(repo / "src" / "clusterlab" / "__init__.py", "a") as handle:
        handle.write("# changed\n")
    assert git_state_of_copy(repo / "src") == {"git_commit": head, "git_dirty": True}
    # A package that sits in a checkout but is not its src/clusterlab (site-packages in a repository): unknown.
    shutil.copytree(repo / "src" / "clusterlab", repo / "venv" / "site" / "clusterlab",
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert git_state_of_copy(repo / "venv" / "site") == {"git_commit": None, "git_dirty": None}


@pytest.mark.parametrize("written, read", [
    ({"git_commit": "abc", "git_dirty": False}, {"git_commit": "abc", "git_dirty": False}),
    ({"git_commit": "abc", "git_dirty": True}, {"git_commit": "abc", "git_dirty": True}),
    ({"git_commit": None, "git_dirty": None}, {"git_commit": None, "git_dirty": None}),
    # runs written before git_dirty was a field of its own
    ({"git_commit": "abc-dirty"}, {"git_commit": "abc", "git_dirty": True}),
    ({"git_commit": "abc"}, {"git_commit": "abc", "git_dirty": False}),
    ({"git_commit": "unknown"}, {"git_commit": None, "git_dirty": None}),
    ({}, {"git_commit": None, "git_dirty": None}),
])
def test_recorded_git_state_reads_old_and_new_runs(written, read):
    assert config.recorded_git_state(written) == read


# ---- one vocabulary: the common flag names, the upstream spellings as aliases -------------------------------------

# Every renamed flag: (program, method, upstream spelling, common name, a value that is not the default).
ALIASES = [
    ("main_pretrain", "swav", "hidden_mlp", "hidden_dim", 64), ("main_pretrain", "swav", "feat_dim", "embed_dim", 32),
    ("main_pretrain", "npid", "low_dim", "embed_dim", 32), ("main_pretrain", "npid", "nce_t", "bank_t", 0.07),
    ("main_pretrain", "npid", "nce_m", "bank_m", 0.25), ("main_pretrain", "superand", "npc_t", "bank_t", 0.07),
    ("main_pretrain", "superand", "npc_m", "bank_m", 0.25), ("main_pretrain", "superand", "low_dim", "embed_dim", 32),
    ("main_cluster", "sela", "hc", "num_heads", 3), ("main_cluster", "sela", "ncl", "head_classes", 20),
    ("main_cluster", "selfclassifier", "cls_size", "head_classes", [20]),
    ("main_cluster", "selfclassifier", "num_cls", "num_heads", 3),
    ("main_cluster", "selfclassifier", "dim", "embed_dim", 32),
    ("main_cluster", "selfclassifier", "fixed_cls", "freeze_heads", True),
    ("main_cluster", "selfclassifier", "queue_len", "queue_length", 512),
    ("main_cluster", "embedul", "low_dim", "embed_dim", 32),
]


def argv_of(flag: str, value) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [f"--{flag}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]


@pytest.mark.parametrize("program, method, alias, name, value", ALIASES, ids=[a[2] + "-" + a[1] for a in ALIASES])
def test_upstream_spelling_sets_the_common_flag_on_the_command_line_and_in_yaml(tmp_path, program, method, alias,
                                                                              name, value):
    entry = entry_module(program)
    on_line = entry.parse_args(["--method", method, *argv_of(alias, value)])
    in_file = entry.parse_args(["--config", write_yaml(tmp_path, {"method": method, alias: value})])
    default = entry.parse_args(["--method", method])
    assert getattr(on_line, name) == getattr(in_file, name) == value != getattr(default, name)
    assert alias not in vars(on_line)  # recorded under the common name only


def test_a_file_that_sets_a_flag_twice_is_refused_naming_both_keys(tmp_path):
    path = write_yaml(tmp_path, {"method": "swav", "embed_dim": 64, "feat_dim": 32})
    with pytest.raises(ConfigError) as caught:
        pretrain.parse_args(["--config", path])
    message = str(caught.value)
    assert "'embed_dim' and 'feat_dim' both set --embed_dim" in message and path in message and "\n" not in message


@pytest.mark.parametrize("base, child", [({"feat_dim": 32}, {"embed_dim": 64}), ({"embed_dim": 32}, {"feat_dim": 64})])
def test_a_file_overrides_its_base_whatever_spelling_either_uses(tmp_path, base, child):
    write_yaml(tmp_path, {"method": "swav", **base}, "base.yaml")
    path = write_yaml(tmp_path, {"base": "base.yaml", **child})
    assert pretrain.parse_args(["--config", path]).embed_dim == 64
    assert pretrain.parse_args(["--config", path, "--feat_dim", "16"]).embed_dim == 16  # the command line wins


def test_a_grid_overrides_its_config_whatever_spelling(tmp_path):
    """configs/swav_digits.yaml says embed_dim: 128; the grid's feat_dim replaces it, and its runs pass the common
    name. One grid that spells one flag twice is refused."""
    from clusterlab.slurm.grid import load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "config": CONFIG, "axes": {"seed": [0]}, "flags": {"feat_dim": 8}}))
    run = load_grid(grid, tmp_path).runs[0]
    assert run.flags["embed_dim"] == 8 and "feat_dim" not in run.flags
    assert pretrain.parse_args(run.argv()).embed_dim == 8
    grid.write_text(yaml.safe_dump({"name": "g", "config": CONFIG, "axes": {"embed_dim": [8]},
                                    "flags": {"feat_dim": 8}}))
    with pytest.raises(ConfigError, match="'feat_dim' and 'embed_dim' both set --embed_dim"):
        load_grid(grid, tmp_path)


def test_a_run_recorded_under_the_upstream_spellings_is_evaluated_with_its_values(tiny_run, tmp_path):
    """A run trained before the rename records feat_dim / hidden_mlp (16 / 32, not the defaults 128 / 2048) in its
    config.yaml and checkpoint: evaluation rebuilds the model with the run's values, or its weights would not fit."""
    from clusterlab import checkpoint
    from clusterlab.eval.features import load_run

    old_names = {"embed_dim": "feat_dim", "hidden_dim": "hidden_mlp"}
    run = copy_run(tiny_run, tmp_path / "old_run")
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    recorded["args"] = {old_names.get(k, k): v for k, v in recorded["args"].items()}
    (run / "config.yaml").write_text(yaml.safe_dump(recorded, sort_keys=False))
    state = checkpoint.load(run / "checkpoint.pth")
    state["args"] = {old_names.get(k, k): v for k, v in state["args"].items()}
    checkpoint.save({k: v for k, v in state.items() if k not in ("format", "schema", "kind", "method")},
                    run / "checkpoint.pth", kind=state["kind"], method=state["method"])
    assert "embed_dim" not in recorded["args"] and recorded["args"]["feat_dim"] == 16
    loaded = load_run(run, None, torch.device("cpu"))
    assert (loaded.args.embed_dim, loaded.args.hidden_dim) == (16, 32)
    assert loaded.method.prototypes.weight.shape == (10, 16)


@pytest.mark.parametrize("base_values, values, argv, expected", [
    ({"freeze_prototypes_epochs": 1.0}, {}, ["--freeze_prototypes_niters", "0"], (0, None)),
    ({"freeze_prototypes_epochs": 1.0}, {}, [], (313, 1.0)),
    ({"freeze_prototypes_epochs": 1.0}, {"freeze_prototypes_niters": 50}, [], (50, None)),
    ({"freeze_prototypes_niters": 50}, {"freeze_prototypes_epochs": 2.0}, [], (313, 2.0)),
    ({"freeze_prototypes_niters": 50}, {}, ["--freeze_prototypes_epochs", "2"], (313, 2.0)),
], ids=["command-line-iterations", "file-epochs", "child-file-iterations", "child-file-epochs",
        "command-line-epochs"])
def test_the_length_in_the_unit_named_last_applies(tmp_path, base_values, values, argv, expected):
    """--freeze_prototypes_niters and --freeze_prototypes_epochs give one length: a config file, or the command line,
    that names one of them undoes what an earlier layer gave the other."""
    write_yaml(tmp_path, {"method": "swav", **base_values}, "base.yaml")
    path = write_yaml(tmp_path, {"base": "base.yaml", **values})
    args = pretrain.parse_args(["--config", path, *argv])
    assert (args.freeze_prototypes_niters, args.freeze_prototypes_epochs) == expected


@pytest.mark.parametrize("values, argv, source", [
    ({}, ["--freeze_prototypes_epochs", "3", "--freeze_prototypes_niters", "7"], "the command line"),
    ({"freeze_prototypes_epochs": 3.0, "freeze_prototypes_niters": 7}, [], "c.yaml"),
])
def test_both_units_of_one_length_in_one_layer_are_refused(tmp_path, values, argv, source):
    """Neither is named after the other there: epochs applied, whatever their order (--help: the one named last)."""
    path = write_yaml(tmp_path, {"method": "swav", **values})
    with pytest.raises(ConfigError, match="--freeze_prototypes_epochs and --freeze_prototypes_niters give one length "
                                          "in different units; name one of them") as caught:
        pretrain.parse_args(["--config", path, *argv])
    assert source in str(caught.value)


def test_a_methods_own_drops_do_not_stand_against_another_schedule():
    """NPID's recipe drops (120 160) are its flags' defaults: a run asking only for --schedule cosine was refused
    for drops it never gave, and a run started so before the refusal could not be requeued."""
    args = pretrain.parse_args(["--method", "npid", "--dataset", "digits", "--schedule", "cosine"])
    assert (args.schedule, args.lr_drops) == ("cosine", [120, 160])
    with pytest.raises(ConfigError, match="--lr_drops 10 20 does nothing in this run: it applies to --schedule step"):
        pretrain.parse_args(["--method", "npid", "--dataset", "digits", "--schedule", "cosine", "--lr_drops", "10",
                             "20"])


def test_a_config_files_drops_stand_against_another_schedule_as_in_a_grid(tmp_path):
    """configs/npid_fashion_mnist.yaml's drops (4 5) are not NPID's own: with --schedule cosine the job trained a
    cosine schedule while config.yaml recorded the drops (the config had made them the parser's defaults), and a
    grid of the same flags was refused."""
    from clusterlab.slurm.grid import load_grid

    with pytest.raises(ConfigError, match=r"--lr_drops 4 5 does nothing in this run: it applies to --schedule step"):
        pretrain.parse_args(["--config", str(ROOT / "configs" / "npid_fashion_mnist.yaml"), "--schedule", "cosine"])
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "config": str(ROOT / "configs" / "npid_fashion_mnist.yaml"),
                                    "axes": {"schedule": ["cosine"]}}))
    with pytest.raises(ConfigError, match=r"--lr_drops 4 5 does nothing in this run: it applies to --schedule step"):
        load_grid(grid, tmp_path / "runs")


def test_every_true_false_flag_stands_alone_for_true():
    """`--sync_bn` alone failed with 'expected one argument' where `--compile` alone worked: every switch of every
    program takes both forms."""
    from clusterlab.programs import eval_cluster, eval_linear

    args = pretrain.parse_args(["--method", "swav", "--dataset", "digits", "--sync_bn", "--nesterov", "--optimizer",
                                "sgd", "--compile"])
    assert (args.sync_bn, args.nesterov, args.compile) == (True, True, True)
    assert pretrain.parse_args(["--method", "swav", "--sync_bn", "false"]).sync_bn is False
    assert config.parse(eval_cluster.get_args_parser(), ["--run", "x", "--plot"]).plot is True
    assert config.parse(eval_linear.get_args_parser(), ["--run", "x", "--cached_features"]).cached_features is True


@pytest.mark.parametrize("config_file", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")
                                                if p.name != "recipes.yaml"))
def test_every_shipped_config_parses_in_its_program(config_file):
    """Each config in configs/ starts its program: every key a flag of the method it names, and no optimisation
    flag that its optimiser and schedule do not read (Self-Classifier's CIFAR configs gave --start_warmup 0.0
    without a warm-up)."""
    from clusterlab.programs import train

    path = ROOT / "configs" / config_file
    method = {key: value for _, values in config.config_layers(path) for key, value in values.items()}.get("method")
    kind = "cluster" if method in train.methods_of("cluster") else "pretrain"
    args = train.parse_args(kind, ["--config", str(path)])
    assert args.method == (method or train.DEFAULT_METHOD[kind])


@pytest.mark.parametrize("kind, argv, words", [
    ("pretrain", ["--schedule", "constant", "--final_lr", "0.1"],
     "--final_lr 0.1 does nothing in this run: it applies to --schedule cosine; leave it out"),
    ("pretrain", ["--optimizer", "sgd", "--lars_trust", "0.01"], "--lars_trust 0.01 does nothing in this run"),
    ("pretrain", ["--warmup_epochs", "0", "--start_warmup", "0.1"], "--start_warmup 0.1 does nothing in this run"),
    ("cluster", ["--method", "scan", "--momentum", "0.5"], "--momentum 0.5 does nothing in this run"),
    ("cluster", ["--method", "sela", "--lr_drops", "--lr_gamma", "0.5"], "--lr_gamma 0.5 does nothing in this run"),
])
def test_a_training_flag_that_does_nothing_is_refused(kind, argv, words):
    """A training run given an optimisation flag its optimiser and schedule do not read trained what the run without
    it trains, under a config.yaml of its own (a grid axis over it: runs with the same numbers)."""
    from clusterlab.programs import train

    with pytest.raises(ConfigError, match=re.escape(words)):
        train.parse_args(kind, ["--dataset", "digits", *argv])
    train.parse_args(kind, ["--dataset", "digits", *argv[:2]])  # the flags the method reads pass


@pytest.mark.parametrize("method", ["sela", "scan"])
def test_a_fractional_number_of_classes_in_a_config_is_refused(tmp_path, method):
    """int(2.5) would silently be 2: the class counts' own types are integer types too."""
    path = write_yaml(tmp_path, {"method": method, "head_classes": 2.5})
    with pytest.raises(ConfigError) as caught:
        entry_module("main_cluster").parse_args(["--config", path])
    assert "key 'head_classes'" in str(caught.value) and "expected an integer, got 2.5" in str(caught.value)
