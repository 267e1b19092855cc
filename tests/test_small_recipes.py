"""The small-data recipes (configs/swav_small.yaml, unmix_small.yaml) are exactly the tries of
scripts/small_data_tries.sh that their headers report measurements of."""
from __future__ import annotations

import pytest

from conftest import ROOT


TRY_A = ["--config", "configs/swav_fashion_mnist.yaml", "--dataset", "imagefolder", "--batch_size", "128",
         "--epochs", "60", "--warmup_epochs", "5", "--nmb_prototypes", "30", "--freeze_prototypes_epochs", "1"]
TRY_B = [*TRY_A, "--nmb_crops", "2", "4", "--size_crops", "20", "12", "--min_scale_crops", "0.3", "0.1",
         "--max_scale_crops", "1.0", "0.4"]
TRY_F = [*TRY_B, "--epochs", "120"]


@pytest.mark.parametrize("recipe, measured", [
    ("swav_small", TRY_F),
    ("unmix_small", [*TRY_A, "--method", "unmix", "--unmix_prob", "0.5", "--unmix_beta", "1.0",
                     "--unmix_mode", "faithful", "--epochs", "120"]),
])
def test_the_small_recipes_are_the_tries_their_headers_report(recipe, measured, monkeypatch):
    """swav_small.yaml resolves to try F of scripts/small_data_tries.sh (B for 120 epochs), unmix_small.yaml to try A
    plus the mixtures for 120 epochs (the flags those command lines give), every flag alike."""
    from conftest import entry_module

    monkeypatch.chdir(ROOT)
    parse = entry_module("main_pretrain").parse_args
    ours = vars(parse(["--config", f"configs/{recipe}.yaml", "--output_dir", "unused"]))
    tried = vars(parse([*measured, "--output_dir", "unused"]))
    differing = {key: (ours.get(key), tried.get(key)) for key in set(ours) | set(tried)
                 if key != "config" and ours.get(key) != tried.get(key)}
    assert not differing
