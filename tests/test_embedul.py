"""EmbedUL stage 2: the IIC loss against the joint-distribution formula, its distributed form, the heads, resume."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from clusterlab.losses.iic import EPS, iic_loss

from conftest import assert_user_error, entry_module, run_script
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
TINY = ["--dataset", "digits", "--width", "4", "--batch_size", "64", "--size_crops", "8", "--device", "cpu",
        "--log_every", "100"]


def naive_iic(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IIC written out: joint from sums over samples, symmetrised, normalised; marginals; clamps; -MI."""
    classes = a.shape[1]
    joint = [[sum(a[n, i] * b[n, j] for n in range(a.shape[0])) for j in range(classes)] for i in range(classes)]
    joint = torch.stack([torch.stack(row) for row in joint])
    joint = (joint + joint.t()) / 2
    joint = joint / joint.sum()
    total = 0.0
    for i in range(classes):
        for j in range(classes):
            p_ij = torch.clamp(joint[i, j], min=EPS)
            p_i = torch.clamp(joint[i, :].sum(), min=EPS)
            p_j = torch.clamp(joint[:, j].sum(), min=EPS)
            total = total - p_ij * (torch.log(p_ij) - torch.log(p_i) - torch.log(p_j))
    return total


def test_iic_loss_matches_the_joint_distribution_formula_and_its_gradient():
    torch.manual_seed(0)
    logits_a = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    logits_b = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    ours = iic_loss(F.softmax(logits_a, 1), F.softmax(logits_b, 1))
    theirs = naive_iic(F.softmax(logits_a, 1), F.softmax(logits_b, 1))
    assert torch.allclose(ours.double(), theirs, atol=1e-6)
    grad_ours = torch.autograd.grad(ours, (logits_a, logits_b))
    grad_theirs = torch.autograd.grad(theirs, (logits_a, logits_b))
    for x, y in zip(grad_ours, grad_theirs):
        assert torch.allclose(x.double(), y, atol=1e-6)


def test_iic_loss_is_minus_the_mutual_information_of_hard_assignments():
    """Two views always in the same one of C equally used classes: I = log C, so the loss is -log C."""
    one_hot = F.one_hot(torch.arange(20) % 5, 5).float()
    assert math.isclose(float(iic_loss(one_hot, one_hot)), -math.log(5), rel_tol=1e-6)
    independent = torch.full((20, 5), 0.2)
    assert abs(float(iic_loss(independent, independent))) < 1e-6


def _iic_on_ranks(rank, world_size, a, b):
    share = a.shape[0] // world_size
    mine_a = a[rank * share:(rank + 1) * share].clone().requires_grad_()
    mine_b = b[rank * share:(rank + 1) * share].clone().requires_grad_()
    loss = iic_loss(F.softmax(mine_a, 1), F.softmax(mine_b, 1))
    loss.backward()
    return loss.detach(), mine_a.grad, mine_b.grad


def test_iic_loss_on_two_processes_equals_one_process():
    torch.manual_seed(1)
    a, b = torch.randn(16, 6), torch.randn(16, 6)
    results = run_distributed(_iic_on_ranks, 2, a, b)
    whole_a, whole_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = iic_loss(F.softmax(whole_a, 1), F.softmax(whole_b, 1))
    loss.backward()
    # Every rank's loss is the global one, and the all-reduce's backward sums the W ranks' (equal) gradients, so a
    # rank's rows get W times the one-process gradient; DDP's average over ranks divides the W back out.
    for rank, (value, grad_a, grad_b) in enumerate(results):
        assert torch.allclose(value, loss.detach(), atol=1e-6)
        assert torch.allclose(grad_a, 2 * whole_a.grad[rank * 8:(rank + 1) * 8], atol=1e-6)
        assert torch.allclose(grad_b, 2 * whole_b.grad[rank * 8:(rank + 1) * 8], atol=1e-6)


def build(*flags):
    main_cluster = entry_module("main_cluster")
    from clusterlab import data
    from clusterlab.methods import METHODS, DataInfo

    args = main_cluster.parse_args(["--method", "embedul", *TINY, "--output_dir", "unused", *flags])
    torch.manual_seed(0)
    return METHODS["embedul"](args, DataInfo.of(data.load("digits", "train")), torch.device("cpu"))


def test_heads_normalisation_axes_and_fixed_or_trained():
    method = build()
    assert method.head_sizes == [10] * 5
    assert all(not w.requires_grad for w in method.heads)  # upstream never optimises them
    per_feature = method.normalized_heads()[0]
    assert torch.allclose(per_feature.norm(dim=1), torch.ones(per_feature.shape[0]), atol=1e-6)
    per_class = build("--head_norm", "class").normalized_heads()[0]
    assert torch.allclose(per_class.norm(dim=0), torch.ones(per_class.shape[1]), atol=1e-6)
    trained = build("--freeze_heads", "false")
    assert all(w.requires_grad for w in trained.heads)
    logits = method.head_logits(torch.randn(3, 1, 8, 8))
    f = method.embedding(torch.randn(3, 1, 8, 8))
    assert len(logits) == 5 and logits[0].shape == (3, 10) and f.shape == (3, 128)


def test_embedding_under_bf16_autocast_is_float32_from_the_bf16_features():
    """Stage 2 runs the backbone in bf16 on a GPU (`--amp auto`); the linear layer and the normalisation stay in
    float32, as stage 1's (upstream: all float32): in bf16 they moved the head logits f . W / 0.1 by hundredths."""
    method = build().eval()
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        f = method.embedding(images)
        features = method.backbone(images)
        in_bf16 = F.normalize(method.head(features), dim=1)
    with torch.no_grad():
        expected = F.normalize(method.head(features.float()), dim=1)
    assert features.dtype == torch.bfloat16 and f.dtype == torch.float32 and torch.equal(f, expected)
    assert in_bf16.dtype == torch.bfloat16 and (in_bf16.float() - expected).abs().max() > 1e-4


def run(program, *args):
    done = subprocess.run([sys.executable, program, *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def superand_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sand") / "run"
    run("main_pretrain.py", "--method", "superand", *TINY, "--rounds", "2", "--epochs_per_round", "1", "--epochs", "2",
        "--schedule_period", "1", "--output_dir", str(out))
    return out


def test_pipeline_loads_the_encoder_resumes_with_the_same_head_and_is_scored(superand_run, tmp_path):
    stage2 = tmp_path / "embedul"
    first = run("main_cluster.py", "--method", "embedul", *TINY, "--epochs", "2", "--pretrained", str(superand_run),
                "--output_dir", str(stage2))
    assert "backbone, head from" in first.stdout
    encoder = torch.load(superand_run / "checkpoint.pth", weights_only=True)["model"]
    # the heads are fixed, so the encoder alone moved; after 0 epochs it would be Super-AND's exactly
    state = torch.load(stage2 / "checkpoint.pth", weights_only=True)
    heads_before = {k: v for k, v in state["model"].items() if k.startswith("heads.")}
    assert state["method_state"]["last_head_losses"] and len(state["method_state"]["last_head_losses"]) == 5
    assert set(k for k in encoder if k.startswith(("backbone.", "head."))) <= set(state["model"])
    # two more epochs, resumed: the heads are unchanged (fixed) and the loss-based choice is kept in the checkpoint
    run("main_cluster.py", "--method", "embedul", *TINY, "--epochs", "4", "--pretrained", str(superand_run),
        "--output_dir", str(stage2))
    resumed = torch.load(stage2 / "checkpoint.pth", weights_only=True)
    for key, value in heads_before.items():
        assert torch.equal(resumed["model"][key], value)
    losses = resumed["method_state"]["last_head_losses"]
    run("eval_cluster.py", "--run", str(stage2), "--plot", "false")
    records = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    # every head's own record, and the chosen head's second one (the run's result), with the same numbers
    every = {r["protocol"]["head"]: r["metrics"] for r in records if r["protocol"]["selection"] == "all-heads"}
    assert sorted(every) == [0, 1, 2, 3, 4]
    chosen = [r for r in records if r["protocol"].get("chosen")]
    assert [r["protocol"]["head"] for r in chosen] == [min(range(5), key=losses.__getitem__)]
    assert chosen[0]["protocol"]["selection"] == "lowest-loss"
    assert chosen[0]["metrics"] == every[chosen[0]["protocol"]["head"]]
    assert all(r["protocol"]["assignment"] == "head" and r["split"] == "test" for r in records)
    # k-means flags do nothing to heads: refused rather than ignored
    refused = run_script("eval_cluster.py", "--run", stage2, "--clusters", 50, "--plot", "false")
    assert_user_error(refused, "eval_cluster.py", "--clusters applies to k-means", "--assignment kmeans")


def test_a_stage_2_run_resumes_after_its_pretrained_run_is_gone(superand_run, tmp_path):
    """Its normalisation comes from its own checkpoint once it has one (the --pretrained run is read at the start
    only)."""
    source, stage2 = tmp_path / "sand", tmp_path / "embedul"
    shutil.copytree(superand_run, source)
    run("main_cluster.py", "--method", "embedul", *TINY, "--epochs", "1", "--pretrained", str(source), "--output_dir",
        str(stage2))

    origin = yaml.safe_load((stage2 / "config.yaml").read_text())["pretrained_from"]
    shutil.rmtree(source)
    resumed = run("main_cluster.py", "--method", "embedul", *TINY, "--epochs", "2", "--pretrained", str(source),
                  "--output_dir", str(stage2))
    assert "from the end of epoch 1 " in resumed.stdout
    # what it started from is recorded at the start and again at the resume, from its own checkpoint
    assert origin["checkpoint"] == str((source / "checkpoint.pth").resolve())
    assert (origin["method"], origin["args"]["method"], origin["pretrained_from"]) == ("superand", "superand", None)
    assert origin["epoch"] == origin["args"]["epochs"] >= 1
    assert origin["training_set"] == yaml.safe_load((stage2 / "config.yaml").read_text())["training_set"]
    assert yaml.safe_load((stage2 / "config.yaml").read_text())["pretrained_from"] == origin


@pytest.mark.parametrize("flag, value", [("--width", "8"), ("--embed_dim", "7")])
def test_pretrained_of_another_width_or_embedding_size_is_refused_by_the_flag(superand_run, tmp_path, flag, value):
    """The embedding size was refused by torch's size-mismatch text for the head, which named no flag."""
    done = subprocess.run([sys.executable, "main_cluster.py", "--method", "embedul", *TINY, flag, value,
                           "--pretrained", str(superand_run), "--output_dir", str(tmp_path / "x")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert f"this run has {flag} {value}" in done.stderr and not (tmp_path / "x").exists()


def test_a_run_of_another_method_is_named_before_its_flags_and_one_that_fits_gets_a_note(superand_run, tmp_path):
    """A SwAV run was refused for its --embed_dim (given that, then for its missing head): the missing part comes
    first now. An NPID run (a backbone and an embedding head of the same shapes) trained on without a word, though
    EmbedUL's recipe starts from Super-AND."""
    swav = tmp_path / "swav"
    run("main_pretrain.py", *TINY, "--epochs", "1", "--nmb_prototypes", "10", "--output_dir", str(swav))
    done = subprocess.run([sys.executable, "main_cluster.py", "--method", "embedul", *TINY, "--epochs", "1",
                           "--pretrained", str(swav), "--output_dir", str(tmp_path / "x")], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "holds no 'head' weights (method 'swav')" in done.stderr, done.stderr
    embed_dim = yaml.safe_load((superand_run / "config.yaml").read_text())["args"]["embed_dim"]
    npid = tmp_path / "npid"
    run("main_pretrain.py", "--method", "npid", *TINY, "--epochs", "1", "--embed_dim", str(embed_dim), "--arch",
        "resnet18_sobel", "--output_dir", str(npid))
    stage2 = run("main_cluster.py", "--method", "embedul", *TINY, "--epochs", "1", "--pretrained", str(npid),
                 "--output_dir", str(tmp_path / "from_npid"))
    assert (f"note: --pretrained {str(npid)!r} is a npid run; embedul's recipe starts from a Super-AND run "
            f"(EmbedUL's stage 1); it starts from that run's backbone and head all the same") in stage2.stdout
    assert "is a superand run" not in run("main_cluster.py", "--method", "embedul", *TINY, "--epochs", "1",
                                          "--pretrained", str(superand_run),
                                          "--output_dir", str(tmp_path / "from_superand")).stdout


def test_the_chosen_head_comes_from_the_epoch_just_trained(tmp_path):
    """After one epoch the choice rests on that epoch's mean loss per head (what train_log.jsonl's epoch record
    says), not on the epoch before."""
    from clusterlab import rundir
    from test_amp import trainer_for

    trainer = trainer_for("embedul", "off", tmp_path / "run")
    assert trainer.train_one_epoch(0)
    means = [r for r in rundir.read_jsonl(tmp_path / "run" / "train_log.jsonl") if r.get("epoch_end")][0]
    expected = [means[f"head{h}_mean"] for h in range(2)]
    assert trainer.method.last_head_losses == pytest.approx(expected, rel=1e-6)
    assert trainer.method.chosen_head() == min(range(2), key=expected.__getitem__)


def test_heads_of_different_sizes_are_compared_on_the_scale_of_log_k():
    """Cross-entropy over K clusters is log K at uniform predictions: a 20-cluster head at loss 2.5 (0.83 log 20) has
    learnt more than a 10-cluster head at 2.0 (0.87 log 10); heads of one size compare by their plain losses."""
    from clusterlab.methods.cluster_base import lowest_loss_head

    assert lowest_loss_head([2.0, 2.5], [10, 20]) == 1
    assert lowest_loss_head([2.0, 2.5], [10, 10]) == 0 == lowest_loss_head([2.0, 2.5])
    assert lowest_loss_head([], [10]) == 0 and lowest_loss_head([], [10, 20]) is None is lowest_loss_head([])
    assert lowest_loss_head([0.0, 0.5], [1, 10]) == 0  # a one-cluster head: no division by log 1 = 0
