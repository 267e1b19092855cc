"""bench/gpu_check.py at toy sizes on the CPU: the whole check runs, every row is in its table, every training loss
is finite; a failing row is reported in its row while the others run; a spent time budget skips rows but still
gives the whole table. (The --compile row is left out here with --skip_compile: compiling takes minutes on a CPU
whatever the sizes, and tests/test_compile.py checks --compile itself.)"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest

from clusterlab.methods import METHODS
from conftest import PYTHON, ROOT, assert_ok, script_env

SCRIPT = ROOT / "bench" / "gpu_check.py"


def run_check(*flags, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(SCRIPT), "--device", "cpu", "--tiny", *flags], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


def table_rows(text: str) -> list[list[str]]:
    """The cells of every row of the Markdown table, header and rule excluded."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| part | check | result |") and set(lines[1]) <= set("|- "), lines[:2]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # dataclasses look their module up there
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # its own folder, as `python bench/gpu_check.py` has it
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_check_on_the_cpu_has_every_row_and_finite_losses(tmp_path):
    out = tmp_path / "table.md"
    result = run_check("--skip_compile", "--out", out)
    assert_ok(result)
    assert out.read_text() == result.stdout  # stdout holds the table only; the methods' messages go to stderr
    rows = table_rows(result.stdout)
    assert all(len(row) == 5 for row in rows), rows
    by_part = {}
    for part, check, outcome, goal, verdict in rows:
        by_part.setdefault(part, []).append((check, outcome, goal, verdict))
    setup = {check: outcome for check, outcome, _, _ in by_part["-"]}
    assert setup["device"].startswith("CPU: ") and setup["software"].startswith("torch ")
    assert "total wall time" in setup

    trained = by_part["a"] + [row for row in by_part["b"] if "skipped" not in row[1]]
    assert [check.split(" ")[0] for check, *_ in by_part["a"]] == list(METHODS)
    assert len(trained) == len(METHODS) + 2
    # every step's loss finite: (a) 4 steps a method, (b) 1 warm-up and 4 timed (the script's TINY sizes)
    for check, outcome, goal, verdict in trained:
        assert re.search(r"loss -?\d+\.\d{4} -> -?\d+\.\d{4}, all (4|5) finite", outcome), (check, outcome)
        assert f"all {5 if check.startswith('SwAV') else 4} finite" in outcome, (check, outcome)
        assert verdict in ("ok", "n/a (goal is for full sizes on a GPU)"), (check, verdict)
    # the loop's epoch: 256 images, batch 16, 16 steps
    assert re.search(r"\d img/s, epoch of 16 steps \(256 of 256 images\) \d", by_part["b"][0][1])
    assert by_part["b"][1][0].endswith("--channels_last")
    assert re.search(r"\d img/s, epoch of 16 steps \(256 of 256 images\) \d.*; x\d+\.\d\d the eager rate",
                     by_part["b"][1][1])
    assert by_part["b"][2][1:] == ("skipped: --skip_compile", "epoch <= 3 s", "skipped")

    operations = [check.split(",")[0] for check, *_ in by_part["c"]]
    assert operations == ["Sinkhorn", "SeLa labelling Sinkhorn", "weighted kNN"]
    assert [goal for _, _, goal, _ in by_part["c"]] == ["<= 1 ms", "<= 1 s", "<= 1 s"]
    assert all(re.match(r"\d+(\.\d+)? (us|ms|s)\b", outcome) for _, outcome, _, _ in by_part["c"]), by_part["c"]
    device_side, per_image = by_part["d"]
    assert re.match(r"[\d,]+ img/s \(batch 4 of 64x64 uint8 on cpu", device_side[1]), device_side
    assert re.search(r"img/s on one core .* replaces [\d.,]+ such cores", per_image[1]), per_image
    assert "ERROR" not in result.stdout and "error:" not in result.stdout


def test_a_spent_budget_skips_every_row_but_keeps_the_table():
    result = run_check("--budget_s", "0", timeout=120)
    assert_ok(result)
    rows = table_rows(result.stdout)
    checks = [row for row in rows if row[0] != "-"]
    assert len(checks) == len(METHODS) + 3 + 3 + 2
    assert all(row[2] == "skipped: the time budget was spent" and row[4] == "skipped" for row in checks), checks


def test_a_failing_row_is_reported_in_its_row_and_the_others_still_run(monkeypatch, tmp_path):
    gpu_check = load_script(monkeypatch)

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    monkeypatch.setattr(gpu_check, "planned_rows", lambda context, parts, skip_compile: [
        ("a", "first", "finite loss", broken), ("c", "second", "<= 1 s", lambda: ("0.5 s", "met"))])
    context = gpu_check.Check(gpu_check.torch.device("cpu"), gpu_check.TINY, True, tmp_path, deadline=float("inf"))
    rows = gpu_check.run_checks(context, {"a", "c"}, skip_compile=False, started=0.0)
    first, second = [row for row in rows if row.part != "-"]
    assert (first.result, first.verdict) == ("error: RuntimeError: CUDA error: an illegal memory access was "
                                             "encountered", "ERROR")
    assert (second.result, second.verdict) == ("0.5 s", "met")
