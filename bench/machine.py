"""The machine a benchmark ran on, as its table's header names it (bench/RESULTS.md records it with every table)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name and the cores this process may run on ("AMD EPYC, 2 cores")."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {cores} cores"
    return f"{cores} CPU cores"
