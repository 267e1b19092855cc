"""Shared helpers for the tests that run the entry scripts: tiny settings, a subprocess runner, one-line error checks,
directory snapshots, and one tiny trained run per test process.

Test modules import the helpers with `from conftest import ...` (the tests folder is on sys.path).
"""
from __future__ import annotations

import gzip
import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CONFIG = str(ROOT / "configs" / "swav_digits.yaml")
# SwAV on digits, small enough that an epoch takes well under a second on one CPU thread.
TINY = ["--config", CONFIG, "--width", "4", "--hidden_dim", "32", "--embed_dim", "16", "--nmb_prototypes", "10",
        "--batch_size", "64", "--size_crops", "8", "--epochs", "2", "--device", "cpu"]
# What the tiny_run fixture adds: two epoch checkpoints, and the kNN monitor after every epoch.
TINY_RUN = ["--checkpoint_epochs", "1", "2", "--knn_monitor_every", "1"]
# One and two epochs of TINY with a progress record per step (step_losses reads them back).
ONE_EPOCH = [*TINY, "--epochs", "1", "--log_every", "1"]
TWO_EPOCHS = [*TINY, "--epochs", "2", "--log_every", "1"]


def step_losses(run_dir: Path, epoch: int) -> list[float]:
    """The loss of every step of `epoch` that RUN/train_log.jsonl records (all of them with --log_every 1)."""
    records = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("epoch") == epoch and "step" in r]


def script_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script(script: str, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run an entry script of the repository root (`main_pretrain.py`, ...) with `args`; text output captured."""
    return subprocess.run([PYTHON, str(ROOT / script), *map(str, args)], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_user_error(result: subprocess.CompletedProcess, script: str, *words: str) -> str:
    """Exit status 2 and exactly one stderr line `SCRIPT: error: ...` holding every one of `words`."""
    lines = result.stderr.splitlines()
    assert result.returncode == 2, f"exit {result.returncode}, stderr:\n{result.stderr}"
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith(f"{script}: error: "), lines[0]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


class HostCopies(TorchDispatchMode):
    """Counts the copies from the host to another device, blocking and not: a blocking one makes the host wait for
    all the work queued on a GPU. Anything that reads a value back from the device fails outright on `meta`."""

    def __init__(self):
        super().__init__()
        self.blocking = self.non_blocking = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and args[0].device.type == "cpu" and out.device.type != "cpu":
            if kwargs.get("non_blocking"):
                self.non_blocking += 1
            else:
                self.blocking += 1
        if func is torch.ops.aten.copy_.default and args[1].device.type == "cpu" and args[0].device.type != "cpu":
            self.blocking += 1
        return out


def assert_same_tensors(ours, theirs, where="") -> None:
    """Equal structure; tensors equal bit for bit (torch.equal); everything else ==."""
    if isinstance(ours, torch.Tensor):
        same = isinstance(theirs, torch.Tensor) and ours.dtype == theirs.dtype and torch.equal(ours, theirs)
        assert same, f"{where} differs"
    elif isinstance(ours, dict):
        assert set(ours) == set(theirs), where
        for key in ours:
            assert_same_tensors(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same_tensors(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, where


def snapshot(path: Path) -> dict | None:
    """{relative path: sha256} of every file under `path`; None when it does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def entry_module(name: str):
    """A program by its script's name without .py: get_args_parser() and main(argv), and for the training programs
    parse_args(argv) and add_method_args(parser, known), as the package defines them."""
    from functools import partial
    from types import SimpleNamespace

    from clusterlab.programs import PROGRAMS

    program = PROGRAMS[f"{name}.py"]
    module = program.load()
    if program.program_kind is None:
        return SimpleNamespace(get_args_parser=module.get_args_parser, main=module.main)
    kind = program.program_kind
    return SimpleNamespace(get_args_parser=partial(module.get_args_parser, kind), main=partial(module.main, kind),
                           parse_args=partial(module.parse_args, kind),
                           add_method_args=partial(module.add_method_args, kind))


def require_installed(paths: list[Path], package: str) -> None:
    """Skip the calling test unless every one of `paths` (files of Debian's `package`) exists; under
    CLUSTERLAB_REQUIRE_DATA=1 (.ci/run sets it) fail instead. `make test` installs the package where it can."""
    missing = [str(path) for path in paths if not Path(path).exists()]
    if not missing:
        return
    reason = (f"{', '.join(missing)} missing (Debian package {package}; `make test` installs it with root and "
              f"apt-get: bash tests/install_fashion_mnist.sh)")
    if os.environ.get("CLUSTERLAB_REQUIRE_DATA") == "1":
        pytest.fail(f"CLUSTERLAB_REQUIRE_DATA=1 but {reason}")
    pytest.skip(reason)


def write_fashion_mnist(folder: Path, train: int = 100, test: int = 50, cut: int = 0) -> str:
    """A small Fashion-MNIST in its real format (IDX .gz files) under `folder`; `cut` bytes are taken off the end of
    the training images (a truncated download)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        for kind, shape in (("images-idx3-ubyte", (n, 28, 28)), ("labels-idx1-ubyte", (n,))):
            data = rng.integers(0, 10 if kind.startswith("labels") else 256, shape).astype(np.uint8)
            raw = bytes([0, 0, 8, len(shape)]) + struct.pack(f">{len(shape)}i", *shape) + data.tobytes()
            if prefix == "train" and kind.startswith("images") and cut:
                raw = raw[:-cut]
            with gzip.open(folder / f"{prefix}-{kind}.gz", "wb") as handle:
                handle.write(raw)
    return str(folder)


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(autouse=True)
def no_stop_signal_yet(monkeypatch):
    """Every test starts as a process that has received, heard of and left for no stop signal: a program run in this
    process by an earlier test and stopped for the requeue left signals._leaving set, and the next one's failure was
    then taken for a requeue."""
    from clusterlab import signals

    for name, value in (("_received", None), ("_heard", None), ("_deferring", False), ("_leaving", False)):
        monkeypatch.setattr(signals, name, value)
    monkeypatch.setattr(signals, "_seen", set())


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished 2-epoch run (checkpoint.pth, checkpoint_ep0001.pth, checkpoint_ep0002.pth, kNN monitor records in
    train_log.jsonl); copy it to change it."""
    run_dir = tmp_path_factory.mktemp("tiny") / "swav_digits"
    assert_ok(run_script("main_pretrain.py", *TINY, *TINY_RUN, "--output_dir", run_dir))
    return run_dir


@pytest.fixture
def stop_after(monkeypatch):
    """arm(trainer, n): `signals.received()` reports SIGUSR2 once `trainer` has run `n` steps (the loop asks after
    every step); arm(None) takes the signal back."""
    from clusterlab import signals

    def arm(trainer, n: int = 0):
        monkeypatch.setattr(signals, "received",
                            lambda: signal.SIGUSR2 if trainer is not None and trainer.global_step >= n else None)
    return arm


@pytest.fixture
def run_in_process(monkeypatch, capsys):
    """run(SCRIPT, *args): the entry script's main under run_cli in this process (what `python SCRIPT` runs, without
    a new interpreter's start-up), for a call that must fail; returns its exit status and output."""
    from clusterlab.errors import run_cli

    def run(script: str, *args) -> subprocess.CompletedProcess:
        entry = entry_module(script.removesuffix(".py"))
        monkeypatch.setattr(sys, "argv", [script])  # run_cli names the program after argv[0]
        capsys.readouterr()
        with pytest.raises(SystemExit) as caught:
            run_cli(entry.main, [str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess([script, *args], caught.value.code, captured.out, captured.err)
    return run


# ---- the fast lane: `make test-fast` runs the tests that start no process ------------------------------------------

# What a test (or a fixture it uses) calls when it starts processes: entry scripts (also a program's main run
# in-process: its records and run configs ask git for the commit), spawned ranks, data loader workers, Slurm jobs.
SPAWNING = ("run_script(", "subprocess.", "run_distributed(", "Popen(", "mp.spawn(", "torchrun", "workers=", "\"--workers\"",
            ".main(")


def _sources(item) -> list[str]:
    """The source of the test function, of every fixture it uses (directly or through other fixtures), and of the
    functions of the test's module (and this file) that these call, followed to any depth."""
    functions = [item.function]
    for name in item.fixturenames:
        if name == "_no_processes_in_the_fast_lane":
            continue
        definitions = item._fixtureinfo.name2fixturedefs.get(name) or []
        functions += [definition.func for definition in definitions]
    helpers = {**{k: v for k, v in globals().items() if inspect.isfunction(v)},
               **{k: v for k, v in vars(item.module).items() if inspect.isfunction(v)}}
    sources, seen = [], set()
    while functions:
        function = functions.pop()
        if function in seen:
            continue
        seen.add(function)
        try:
            source = inspect.getsource(function)
        except (OSError, TypeError):
            continue
        sources.append(source)
        functions += [helpers[name] for name in re.findall(r"\b(\w+)\(", source) if name in helpers]
    return sources


def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test that starts processes (the fast lane leaves them out): by what its code and its
    fixtures' code call. The fast lane also refuses any process start at run time, so a test this misses fails
    there instead of slowing it down silently."""
    for item in items:
        if any(call in source for source in _sources(item) for call in SPAWNING):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_processes_in_the_fast_lane(monkeypatch):
    if os.environ.get("CLUSTERLAB_FAST_LANE") != "1":
        return

    def refuse(*args, **kwargs):
        raise AssertionError("this test starts a process: it belongs to the slow lane (see SPAWNING in conftest.py)")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    import multiprocessing.process

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    refuse_skip(outcome.get_result())


def refuse_skip(report) -> None:
    """Under CLUSTERLAB_NO_SKIPS=1 (.ci/run sets it) a skipped test is reported failed, with its reason: CI runs
    every test (a missing compiler, mount namespace, cluster or dataset is the machine's fault, not a pass)."""
    if report.skipped and os.environ.get("CLUSTERLAB_NO_SKIPS") == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CLUSTERLAB_NO_SKIPS=1 (CI runs every test), but it was skipped: {reason}"
