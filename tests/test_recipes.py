"""The recipes hold the upstream settings (SwAV's and Un-Mix's hyper-parameters; the pinned code's initialisation,
UE mask and labelling precision for NPID, Super-AND, EmbedUL and SeLa), so a recipe cannot drift from them silently."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clusterlab.programs.train import parse_args
from clusterlab.slurm.grid import load_grid
from clusterlab.slurm.sbatch import recipe_scripts

ROOT = Path(__file__).resolve().parents[1]

# script_unmix_c10.sh / script_unmix_c100.sh, the values upstream really ran with (read from the scripts and
# main_swav_unmix.py's defaults), in our flag names.
UPSTREAM_CIFAR = {
    "arch": "resnet18_bottleneck", "width": 64, "hidden_dim": 512, "embed_dim": 128, "nmb_prototypes": 100,
    "batch_size": 128, "optimizer": "lars", "lr": 0.6, "final_lr": 0.0006, "warmup_epochs": 5, "start_warmup": 0.0,
    "schedule": "cosine", "weight_decay": 1e-6, "momentum": 0.9, "lars_trust": 0.001, "lars_exclude_bias_norm": False,
    "temperature": 0.1, "epsilon": 0.05, "sinkhorn_iterations": 3, "crops_for_assign": [0, 1],
    "freeze_prototypes_niters": 5005, "nmb_crops": [2], "size_crops": [32], "min_scale_crops": [0.14],
    "max_scale_crops": [1.0], "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1, "jitter_p": [0.8],
    "grey_p": [0.2], "blur_p": [0.0], "flip_p": 0.5, "amp": "fp16", "sync_bn": True, "seed": 31,
    "mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010],
}
UNMIX = {"unmix_prob": 0.5, "unmix_beta": 1.0, "unmix_mode": "faithful"}
# The queue as upstream ran it (120 rounded down to 0: none), and the variants with a queue that works.
NO_QUEUE = {"queue_length": 0}
QUEUE = {"queue_length": 3840, "epoch_queue_starts": 15}

RECIPES = {
    "swav_cifar10": ("swav", "cifar10", NO_QUEUE), "swav_cifar100": ("swav", "cifar100", NO_QUEUE),
    "unmix_cifar10": ("unmix", "cifar10", {**UNMIX, **NO_QUEUE}),
    "unmix_cifar100": ("unmix", "cifar100", {**UNMIX, **NO_QUEUE}),
    "swav_cifar10_queue": ("swav", "cifar10", QUEUE), "swav_cifar100_queue": ("swav", "cifar100", QUEUE),
    "unmix_cifar10_queue": ("unmix", "cifar10", {**UNMIX, **QUEUE}),
    "unmix_cifar100_queue": ("unmix", "cifar100", {**UNMIX, **QUEUE}),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_cifar_recipe_resolves_to_the_upstream_values(name):
    method, dataset, extra = RECIPES[name]
    args = vars(parse_args("pretrain", ["--config", f"configs/{name}.yaml", "--output_dir", "unused"]))
    expected = {**UPSTREAM_CIFAR, **extra, "method": method, "dataset": dataset}
    drifted = {key: (args[key], value) for key, value in expected.items() if args[key] != value}
    assert not drifted, f"configs/{name}.yaml drifted from upstream (ours, upstream): {drifted}"


def test_sbatch_recipes_cover_the_published_table():
    """One script per method x dataset x epoch count of the Un-Mix README, with the evaluations chained."""
    scripts = recipe_scripts(ROOT / "configs" / "recipes.yaml", ROOT)
    for method in ("swav", "unmix"):
        for dataset, short in (("cifar10", "c10"), ("cifar100", "c100")):
            for epochs in (200, 400, 600, 800, 1000):
                for variant, config in (("", f"{method}_{dataset}"), ("_queue", f"{method}_{dataset}_queue")):
                    text = scripts[f"{method}_{short}{variant}_{epochs}ep"]
                    assert f"--config configs/{config}.yaml --epochs {epochs} " in text
                    assert "--gpus-per-node=1" in text and "--nodes=1" in text
                    for program in ("eval_linear.py", "eval_knn.py", "eval_cluster.py"):
                        assert f'step "$PYTHON" {program} --run "$EXPERIMENT_PATH"' in text


# Where NPID, Super-AND, EmbedUL and SeLa follow their pinned code: PyTorch's default init of the CIFAR ResNets, as of
# the PyTorch NPID (0.4) and EmbedUL (1.1.0) name (`legacy`: batch-norm weights U(0, 1)), today's for Super-AND, whose
# code names none (the ImageNet ResNet of NPID draws kaiming-normal), the UE entropy with the own logit masked,
# float64 labelling logits.
PINNED_CODE = {
    **{name: {"init": "legacy"} for name in ("npid_cifar10", "npid_cifar100", "npid_stl10", "embedul_cifar10",
                                              "embedul_cifar100", "embedul_cifar100_20", "embedul_stl10")},
    "npid_imagenet": {"init": "kaiming"},
    **{name: {"init": "default", "ue_mask_own": True}
       for name in ("superand_cifar10", "superand_cifar100", "superand_stl10")},
    **{name: {"label_dtype": "float64"} for name in ("sela_cifar10_alexnet", "sela_cifar100_alexnet",
                                                      "sela_cifar10_resnet", "sela_cifar100_resnet")},
}


@pytest.mark.parametrize("name", sorted(PINNED_CODE))
def test_recipe_follows_the_pinned_code(name):
    stage = "cluster" if name.startswith(("embedul", "sela")) else "pretrain"
    args = vars(parse_args(stage, ["--config", f"configs/{name}.yaml", "--output_dir", "unused"]))
    drifted = {key: (args[key], value) for key, value in PINNED_CODE[name].items() if args[key] != value}
    assert not drifted, f"configs/{name}.yaml drifted from the pinned code (ours, upstream): {drifted}"


def test_embedul_stage_one_follows_the_pinned_code(tmp_path):
    stage_one = [run for run in load_grid(ROOT / "configs" / "grids" / "embedul_cifar.yaml", tmp_path).runs
                 if run.stage == "superand"]
    assert len(stage_one) == 3
    for run in stage_one:
        args = parse_args("pretrain", run.argv())
        assert args.ue_mask_own is True and args.init == "legacy", run.name
    recipes = yaml.safe_load((ROOT / "configs" / "recipes.yaml").read_text())
    for name in ("embedul_c10", "embedul_c100_20", "embedul_stl10"):
        assert recipes[name]["stages"][0]["flags"] == {"init": "legacy"}, name


# SCAN's upstream configs (configs/scan/*.yml, configs/selflabel/*.yml at Unsupervised-Classification@952ec31), in
# our flag names: the SCAN loss and the self-labelling, per dataset.
SCAN_COMMON = {"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-4, "schedule": "constant", "warmup_epochs": 0,
               "strong_ops": 4, "arch": "resnet18_cifar", "width": 64}
SCAN_STAGE2 = {**SCAN_COMMON, "method": "scan", "num_heads": 1, "num_neighbours": 20, "entropy_weight": 5.0}
SCAN_STAGE3 = {**SCAN_COMMON, "method": "scan_selflabel", "confidence_threshold": 0.99, "class_balance": True,
               "ema": False, "batch_size": 1000}
SCAN_RECIPES = {
    "scan_cifar10": {**SCAN_STAGE2, "dataset": "cifar10", "epochs": 50, "batch_size": 128, "cutout": 16},
    "scan_cifar100_20": {**SCAN_STAGE2, "dataset": "cifar100_20", "epochs": 100, "batch_size": 512, "cutout": 16},
    "scan_stl10": {**SCAN_STAGE2, "dataset": "stl10", "train_split": "train", "epochs": 100, "batch_size": 128,
                   "cutout": 32},
    "scan_selflabel_cifar10": {**SCAN_STAGE3, "dataset": "cifar10", "epochs": 200, "cutout": 16},
    "scan_selflabel_cifar100_20": {**SCAN_STAGE3, "dataset": "cifar100_20", "epochs": 200, "cutout": 16},
    "scan_selflabel_stl10": {**SCAN_STAGE3, "dataset": "stl10", "train_split": "train", "epochs": 100, "cutout": 32},
}


@pytest.mark.parametrize("name", sorted(SCAN_RECIPES))
def test_scan_recipe_resolves_to_the_upstream_values(name):
    args = vars(parse_args("cluster", ["--config", f"configs/{name}.yaml", "--output_dir", "unused"]))
    drifted = {key: (args[key], value) for key, value in SCAN_RECIPES[name].items() if args[key] != value}
    assert not drifted, f"configs/{name}.yaml drifted from upstream (ours, upstream): {drifted}"


def test_scan_pipelines_chain_three_stages(tmp_path):
    """The grid and the sbatch scripts run an embedding, then scan from it, then self-labelling from the scan run."""
    runs = load_grid(ROOT / "configs" / "grids" / "scan_cifar.yaml", tmp_path).runs
    by_stage = {stage: [run for run in runs if run.stage == stage] for stage in ("npid", "scan", "selflabel")}
    assert all(len(stage_runs) == 3 for stage_runs in by_stage.values())
    for scan_run, selflabel_run in zip(by_stage["scan"], by_stage["selflabel"]):
        assert parse_args("cluster", selflabel_run.argv()).pretrained == str(scan_run.run_dir)
    scripts = recipe_scripts(ROOT / "configs" / "recipes.yaml", ROOT)
    for name in ("scan_c10", "scan_c100_20", "scan_stl10"):
        text = scripts[name]
        assert text.index("main_pretrain.py") < text.index("configs/scan_") < text.index("configs/scan_selflabel_")
        assert '--pretrained "$EXPERIMENT_PATH"/scan' in text and '--pretrained "$EXPERIMENT_PATH"/npid' in text
