"""The programs of the suite, by the name of their root script (as grids, recipes and sbatch scripts write them).

Each program is a module of this package with `get_args_parser()` and `main(argv)`; the scripts at the repository
root, the console commands of an installed package (`clusterlab-pretrain`, `clusterlab-launch`, ...: pyproject.toml)
and the Slurm jobs all run them through `run`, which catches the pre-emption signals before anything heavy is
imported (signals.py). This module imports nothing heavy itself.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from dataclasses import dataclass

from .. import signals


@dataclass(frozen=True)
class Program:
    script: str              # the root script's name
    module: str              # the module that owns its parser and main
    program_kind: str | None = None  # training programs: the program_kind of the methods they train
    eval_kind: str | None = None  # evaluation programs: the "eval" of the records they write
    output_flag: str = "--output_dir"  # where it writes, as a full disk's advice names it

    def load(self):
        return importlib.import_module(self.module)

    def parser(self, values: dict | None = None):
        """The program's parser, with the flags of the method `values` names (training programs)."""
        module = self.load()
        if self.program_kind is None:
            return module.get_args_parser()
        parser = module.get_args_parser(self.program_kind)
        module.add_method_args(self.program_kind, parser, values or {})
        return parser

    def main(self, argv=None):
        module = self.load()
        return module.main(self.program_kind, argv) if self.program_kind else module.main(argv)


EVAL_OUTPUT = "--run (a baseline's --output_dir)"  # evaluations write into the run they score
PROGRAMS: dict[str, Program] = {p.script: p for p in (
    Program("main_pretrain.py", "clusterlab.programs.train", program_kind="pretrain"),
    Program("main_cluster.py", "clusterlab.programs.train", program_kind="cluster"),
    Program("eval_knn.py", "clusterlab.programs.eval_knn", eval_kind="knn", output_flag=EVAL_OUTPUT),
    Program("eval_linear.py", "clusterlab.programs.eval_linear", eval_kind="linear", output_flag="--run"),
    Program("eval_cluster.py", "clusterlab.programs.eval_cluster", eval_kind="cluster", output_flag=EVAL_OUTPUT),
    Program("launch.py", "clusterlab.programs.launch", output_flag="--output_root (or --sbatch_dir)"),
    Program("collect_results.py", "clusterlab.programs.collect_results", output_flag="--out"),
)}
TRAINING_PROGRAMS = tuple(name for name, p in PROGRAMS.items() if p.program_kind)
EVAL_PROGRAMS = {name: p.eval_kind for name, p in PROGRAMS.items() if p.eval_kind}


def run(script: str, argv=None):
    """Catch the stop signals, then run the program (a UserError becomes one line on stderr and exit status 2, Ctrl-C
    one line and 130); once it has ended, or left for the requeue (exit 75), the stop signals are ignored, and a
    process that joined a process group ends there (`end_without_finalising`)."""
    signals.install()
    try:
        try:
            # (inside: a stop signal during these lines left with the signals still caught, and a second one, as
            # Slurm sends, killed the process in its teardown: status 143, not 75)
            for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8, under a strict locale
                if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
                    stream.reconfigure(errors="backslashreplace")
            # (None: started with the descriptor closed, `>&-`; print then writes nothing, as it should)
            sys.stdout, sys.stderr = (stream and OutputThatMayClose(stream) for stream in (sys.stdout, sys.stderr))
            from ..errors import run_cli

            result = run_cli(PROGRAMS[script].main, argv, PROGRAMS[script].output_flag)
        finally:
            signals.ignore()  # (a stop signal before this line leaves through the handlers below)
    except SystemExit as leaving:  # the requeue (75), a one-line error (2), Ctrl-C (130)
        end_without_finalising(leaving.code)
        raise
    except BaseException as crash:  # its traceback, then exit status 1 (130: a Ctrl-C run_cli missed), as Python's
        if signals.leaving():
            # The requeue's SystemExit, raised by the signal handler inside an extension module's code (an import
            # of scikit-learn), came out as that code's own error: still the requeue. Only the error's type is
            # named: its words (numpy's "IMPORTANT: PLEASE READ THIS...") sent users off to mend an installation.
            with contextlib.suppress(OSError, ValueError):
                print(f"(the code the stop signal interrupted raised {type(crash).__name__} on its way out: a "
                      f"consequence of the signal, not a fault of its own)", file=sys.stderr, flush=True)
            end_without_finalising(signals.EXIT_REQUEUE)
            raise SystemExit(signals.EXIT_REQUEUE) from None
        if _joined_a_group():
            lost_rank = sys.modules["clusterlab.distributed"].lost_rank_message(crash)
            if lost_rank:  # not this rank's failure: one line, and the failing rank's traceback stands out
                with contextlib.suppress(OSError, ValueError):
                    print(f"{script}: error: {lost_rank}", file=sys.stderr, flush=True)
            else:
                import traceback

                traceback.print_exc()
            end_without_finalising(crash_status(crash))
        raise
    end_without_finalising(0)
    return result


class OutputThatMayClose:
    """A standard stream whose reader may go away (`| head`, the `| tee` of a terminal that was closed): a write to
    the closed pipe sends the rest of the output to /dev/null instead of ending a training run with a traceback
    (train_log.jsonl, status.json and the records keep what the lines said)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._discard_from_now_on()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._discard_from_now_on()

    def _discard_from_now_on(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def crash_status(crash: BaseException) -> int:
    """The exit status after an uncaught exception's traceback: 130 for Ctrl-C, as a shell reports it, else 1."""
    return 130 if isinstance(crash, KeyboardInterrupt) else 1


def _joined_a_group() -> bool:
    distributed = sys.modules.get("clusterlab.distributed")  # imported by every program that can join one
    return distributed is not None and distributed.joined_a_group()


def end_without_finalising(code) -> None:
    """End a process that joined a process group with exit status `code` now, without the interpreter's finalisation
    (no-op in any other process). Once a DDP wrapper has held the group, gloo's worker threads outlive
    destroy_process_group, and one that lets go of its last finished collective (which holds a Python object) after
    finalisation began cannot take the GIL: it aborts the process, "terminate called without an active exception",
    exit status 134 or -6 after a run that had finished, which torchrun, srun and Slurm report as a failure (a core
    dump showed the worker thread in ~AsyncWork, the main thread in Py_FinalizeEx). Everything the programs write
    is on disk by then (whole files, fsync'ed records); only the standard streams are flushed here."""
    if not _joined_a_group():
        return
    with contextlib.suppress(OSError, ValueError):  # a reader gone (a closed pipe) must not stop the exit
        if code is not None and not isinstance(code, int):  # sys.exit("message") prints it and exits 1
            print(code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code if isinstance(code, int) else int(code is not None))


# Console commands of the installed package (pyproject.toml [project.scripts]).
def pretrain_command():
    run("main_pretrain.py")


def cluster_command():
    run("main_cluster.py")


def eval_knn_command():
    run("eval_knn.py")


def eval_linear_command():
    run("eval_linear.py")


def eval_cluster_command():
    run("eval_cluster.py")


def launch_command():
    run("launch.py")


def collect_command():
    run("collect_results.py")
