#!/usr/bin/env python
"""Time two commands as whole processes, in turn (A B B A A B ...), with the standard library only.

    python bench/paired_runs.py [-n 5] [--warmup 1] [--log_dir DIR] --vs 'COMMAND B' -- COMMAND A ...

Each command first runs `--warmup` times (not counted), then A and B alternate `-n` times, each pair in the other
order than the one before (A B, then B A): neither command always runs second, after the other warmed the caches or
heated the processor. For every counted run: wall seconds (a monotonic clock read around the child, start-up
included), user and system seconds and peak resident memory (the operating system's accounting of the reaped child,
os.wait4; Linux counts, until the child runs its program, the memory of this script that forked it, so a figure at
this script's own size means "at most that"). Prints a Markdown table with the median, min and max of each, and the
ratio of the wall times A / B taken pair by pair: pairing keeps it meaningful when the machine's speed drifts during
the measurement. Without --vs, A alone is timed.

COMMAND B is one string split as a shell splits words (no shell runs it: write `sh -c '...'` for a pipe). What the
commands print goes to DIR/a.log and DIR/b.log (every run, warm-up first), so a figure they print is kept; the exit
status of every run is checked.
"""
from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from clusterlab.config import OneLineErrorParser, non_negative_int, positive_int  # noqa: E402


class Run(NamedTuple):
    wall: float    # seconds
    user: float    # seconds
    system: float  # seconds
    peak: int      # bytes, the largest resident set of the process (Linux reports KiB)


def run_once(command: list[str], log: Path) -> Run:
    with open(log, "ab") as out:
        start = time.monotonic()
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.monotonic() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.exit(f"paired_runs.py: {shlex.join(command)} exited with {child.returncode}; its output is in {log}")
    return Run(wall, usage.ru_utime, usage.ru_stime, usage.ru_maxrss * 1024)


def spread(values: list[float], digits: int = 2) -> str:
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})")


def main():
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=positive_int, default=5, help="counted runs of each command")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="runs of each command not counted")
    parser.add_argument("--vs", default=None, help="command B, one string (the baseline)")
    parser.add_argument("--log_dir", default=None, help="where a.log and b.log go (default: a new temporary folder)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command A, after --")
    args = parser.parse_args()
    command_a = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command_a:
        parser.error("give command A after --")
    try:
        commands = {"A": command_a, **({"B": shlex.split(args.vs)} if args.vs else {})}
    except ValueError as err:
        parser.error(f"--vs {args.vs!r}: {err} (give command B as one shell-quoted string)")
    for name, command in commands.items():  # before a log folder is made
        if not command or shutil.which(command[0]) is None:
            parser.error(f"command {name} {shlex.join(command)!r}: {command[0] if command else 'nothing'!r} is not "
                         f"a program found on the PATH or at that path")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="paired_runs_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    logs = {name: log_dir / f"{name.lower()}.log" for name in commands}
    for _ in range(args.warmup):
        for name, command in commands.items():
            run_once(command, logs[name])
    runs = {name: [] for name in commands}
    for pair in range(args.runs):
        for name in (list(commands) if pair % 2 == 0 else list(commands)[::-1]):
            runs[name].append(run_once(commands[name], logs[name]))
    order = "in turn, A first in odd pairs, B first in even ones" if "B" in commands else "in turn"
    print(f"{args.runs} counted run(s) of each after {args.warmup} warm-up run(s), {order}; output in {log_dir}")
    print()
    print("| command | wall s median (min-max) | user s median (min-max) | system s median (min-max) | peak memory |")
    print("| --- | --- | --- | --- | --- |")
    for name, command in commands.items():
        measured = runs[name]
        peaks = [r.peak / 2 ** 30 for r in measured]
        print(f"| {name}: `{shlex.join(command)}` | {spread([r.wall for r in measured])} | "
              f"{spread([r.user for r in measured])} | {spread([r.system for r in measured])} | "
              f"{min(peaks):.2f}-{max(peaks):.2f} GiB |")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30
    print()
    print(f"(peak memory: a child counts this script's {own:.2f} GiB until it runs its program; a figure at that "
          f"size means at most that)")
    if "B" in runs:
        ratios = [a.wall / b.wall for a, b in zip(runs["A"], runs["B"])]
        print()
        print(f"A / B wall, pair by pair: {spread(ratios, 3)}")


if __name__ == "__main__":
    main()
