"""bench/bank_losses.py on a small bank: it runs and prints its three rows, each with a time in ms."""
from __future__ import annotations

import re

import pytest

from conftest import assert_ok, run_script


@pytest.mark.slow
def test_bank_losses_bench_prints_its_rows():
    result = run_script("bench/bank_losses.py", "--bank", "300", "--repeats", "1")
    assert_ok(result)
    rows = re.findall(r"^\| (NPID full softmax|Super-AND, UE weight 0|Super-AND, UE weight 0\.2) \| \d+ ms",
                      result.stdout, flags=re.M)
    assert rows == ["NPID full softmax", "Super-AND, UE weight 0", "Super-AND, UE weight 0.2"]
