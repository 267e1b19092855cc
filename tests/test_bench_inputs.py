"""The benchmarks refuse what they cannot measure, before any work, with the bad value and what would do (they had
ended in tracebacks, imagefolder_speed.py after writing and timing its first stage)."""
from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import PYTHON, ROOT, script_env


@pytest.mark.parametrize("script, flags, message", [
    ("imagefolder_speed.py", ["--images", "64", "--measure", "64", "--baseline_measure", "64", "--batch", "32"],
     "--images 64 is fewer than --measure + --baseline_measure = 128"),
    ("imagefolder_speed.py", ["--images", "640", "--measure", "64", "--baseline_measure", "32", "--batch", "32"],
     "--baseline_measure 32 must be at least two batches of --batch 32 (the first is a warm-up)"),
    ("ops_speed.py", ["--repeats", "0"], "argument --repeats: '0' is not a positive integer"),
    ("slurm_latency.py", ["--repeats", "0"], "argument --repeats: '0' is not a positive integer"),
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a CUDA device where there is none")
def test_the_imagefolder_bench_refuses_a_missing_gpu_before_writing_its_images():
    result = subprocess.run([PYTHON, str(ROOT / "bench" / "imagefolder_speed.py"), "--device", "cuda"], cwd=ROOT,
                            env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == "imagefolder_speed.py: error: --device cuda: no CUDA device here (use cpu)"
