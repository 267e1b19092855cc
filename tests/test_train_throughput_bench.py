"""bench/train_throughput.py: it times a main_pretrain.py recipe and a main_cluster.py one, and its row names the
precision that ran."""
from __future__ import annotations

import re

import pytest

from conftest import assert_ok, run_script

TINY = ["--dataset", "digits", "--width", "4", "--batch_size", "64", "--size_crops", "8", "--device", "cpu",
        "--steps", "2", "--warmup", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe, precision", [("swav_digits", "float32"), ("sela_fashion_mnist", "bf16")])
def test_train_throughput_times_pretraining_and_class_assignment_recipes(recipe, precision):
    result = run_script("bench/train_throughput.py", "--config", f"configs/{recipe}.yaml", *TINY, "--amp",
                        "bf16" if precision == "bf16" else "off")
    assert_ok(result)
    method = recipe.split("_")[0]
    assert re.search(rf"^\| {method} \| resnet18_cifar w4 \| .* \| 64 \| cpu \| \d+ \| default \| {precision} \| "
                     rf"\d+ \(\d+-\d+\) \|", result.stdout, flags=re.M), result.stdout
