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
    ("paired_runs.py", ["-n", "0", "--", "true"], "argument -n/--runs: '0' is not a positive integer"),
    ("paired_runs.py", [], "give command A after --"),
    ("bank_losses.py", ["--bank", "100"], "--bank 100 is smaller than the batch of 128"),
    ("epoch_plan.py", ["--repeats", "0"], "argument --repeats: '0' is not a positive integer"),
    ("train_throughput.py", ["--steps", "0", "--config", "configs/swav_digits.yaml"],
     "argument --steps: '0' is not a positive integer"),
    ("gpu_check.py", ["--budget_s", "-1"], "argument --budget_s: '-1' is negative"),
    ("kmeans_cost.py", ["--dim", "0"], "argument --dim: '0' is not a positive integer"),
    ("bank_losses.py", ["--threads", "x"], "argument --threads: "),
])
def test_a_bench_refuses_what_it_cannot_measure(script, flags, message):
    """On one line: a bad command line printed argparse's usage block above it."""
    result = subprocess.run([PYTHON, str(ROOT / "bench" / script), *flags], cwd=ROOT, env=script_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"{script}: error: {message}"), \
        result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a CUDA device where there is none")
def test_the_imagefolder_bench_refuses_a_missing_gpu_before_writing_its_images():
    result = subprocess.run([PYTHON, str(ROOT / "bench" / "imagefolder_speed.py"), "--device", "cuda"], cwd=ROOT,
                            env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[-1] == "imagefolder_speed.py: error: --device cuda: no CUDA device here (use cpu)"


def test_paired_runs_times_both_commands_in_turn_and_keeps_their_output(tmp_path):
    result = subprocess.run([PYTHON, str(ROOT / "bench" / "paired_runs.py"), "-n", "2", "--log_dir", str(tmp_path),
                             "--vs", "sh -c 'echo B'", "--", "sh", "-c", "echo A"], cwd=ROOT, env=script_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| A: ") or line.startswith("| B: ")]
    assert [row.split("`")[1] for row in rows] == ["sh -c 'echo A'", "sh -c 'echo B'"]
    assert "A / B wall, pair by pair: " in result.stdout
    # one warm-up and two counted runs of each, their output kept
    assert (tmp_path / "a.log").read_text() == "A\n" * 3 and (tmp_path / "b.log").read_text() == "B\n" * 3
    failed = subprocess.run([PYTHON, str(ROOT / "bench" / "paired_runs.py"), "--log_dir", str(tmp_path), "--", "sh",
                             "-c", "exit 3"], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and failed.stderr.startswith("paired_runs.py: sh -c 'exit 3' exited with 3")


def test_paired_runs_swaps_the_order_in_every_other_pair(tmp_path):
    """A always ran first: B then met the caches and the clock A had warmed, a bias of its own in every ratio."""
    order = tmp_path / "order"
    result = subprocess.run([PYTHON, str(ROOT / "bench" / "paired_runs.py"), "-n", "3", "--warmup", "0", "--log_dir",
                             str(tmp_path), "--vs", f"sh -c 'echo B >> {order}'", "--", "sh", "-c",
                             f"echo A >> {order}"], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert order.read_text().split() == ["A", "B", "B", "A", "A", "B"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_the_gpu_check_without_a_card_is_refused_unless_the_cpu_is_asked_for():
    """Without --device it ran the whole check on the CPU (minutes of full-size work) and wrote its table as the
    GPU's."""
    result = subprocess.run([PYTHON, str(ROOT / "bench" / "gpu_check.py"), "--budget_s", "0"], cwd=ROOT,
                            env=script_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("gpu_check.py: error: --device cuda: no CUDA device is visible to torch "), \
        result.stderr
    assert result.stderr.rstrip().endswith("--device cpu runs the check on the CPU")
