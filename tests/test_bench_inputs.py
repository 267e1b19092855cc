"""The benchmarks refuse what they cannot measure, before any work, with the bad value and what would do (they had
ended in tracebacks, imagefolder_speed.py after writing and timing its first stage)."""
from __future__ import annotations

import subprocess

import pytest

from conftest import PYTHON, ROOT, script_env


@pytest.mark.parametrize("script, flags, message", [
    ("imagefolder_speed.py", ["--images", "64", "--measure", "64", "--baseline_measure", "32", "--batch", "32"],
     "--images 64 is fewer than --measure + --baseline_measure = 96"),
    ("bank_losses.py", ["--bank", "100"], "--bank 100 is smaller than the batch of 128"),
    ("epoch_plan.py", ["--repeats", "0"], "argument --repeats: '0' is not a positive integer"),
    ("train_throughput.py", ["--steps", "0", "--config", "configs/swav_digits.yaml"],
     "argument --steps: '0' is not a positive integer"),
])
def test_a_bench_refuses_what_it_cannot_measure(script, flags, message):
    result = subprocess.run([PYTHON, str(ROOT / "bench" / script), *flags], cwd=ROOT, env=script_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(f"{script}: error: {message}")
