"""The entry scripts at the repository root, loaded as modules so that jobs and grids can use their parsers."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from ..config import yaml_defaults

REPO_ROOT = Path(__file__).resolve().parents[3]
TRAINING_PROGRAMS = ("main_pretrain.py", "main_cluster.py")
EVAL_PROGRAMS = {"eval_knn.py": "knn", "eval_cluster.py": "cluster", "eval_linear.py": "linear"}


def load_program(name: str, repo_root: Path = REPO_ROOT) -> ModuleType:
    path = Path(repo_root) / name
    if not path.is_file():
        from ..errors import ConfigError
        raise ConfigError(f"program {name!r} does not exist in {str(repo_root)!r} (one of: "
                          f"{', '.join((*TRAINING_PROGRAMS, *EVAL_PROGRAMS))})")
    module_name = f"clusterlab_program_{path.stem}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def program_parser(name: str, values: dict, repo_root: Path = REPO_ROOT) -> argparse.ArgumentParser:
    """The program's parser, with the flags of the method `values` names (main_pretrain, main_cluster)."""
    module = load_program(name, repo_root)
    parser = module.get_args_parser()
    if hasattr(module, "add_method_args"):
        module.add_method_args(parser, values)
    return parser


def validate_flags(name: str, values: dict, source: str, repo_root: Path = REPO_ROOT) -> dict:
    """Check that every key is a flag of the program with a value of the right type (ConfigError naming it)."""
    return yaml_defaults(program_parser(name, values, repo_root), values, source)


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
