"""Upstream equivalence: every fixture in tests/golden/ against the clusterlab code that reproduces it.

Each fixture holds inputs and what the original upstream code computed from them at a pinned commit
(tests/golden/README.md says which repository, commit, file and lines, per family). Each test feeds the same inputs
to clusterlab, through the method's own forward pass where there is one (SwAV and Un-Mix with the queue and the
Sinkhorn, NPID, Super-AND and EmbedUL with their memory bank or heads; the backbone replaced by the identity, so the
fixture's embeddings are the network's output), and asserts the outputs within a tolerance (in each check, and per
family in tests/golden/README.md): the round-off observed between upstream and clusterlab, with a margin. A change
that breaks the equivalence fails here. Every comparison prints its maximum difference (`pytest -s`).

Where clusterlab offers a setting that differs from the pinned code (Super-AND's `--ue_mask_own false`, from its
first commit; EmbedUL's `--head_norm class`, the paper's), the test runs the setting that reproduces upstream and
checks that the other one really gives other values; Un-Mix runs `--unmix_mode faithful`. With more clusters than
classes the upstream codes map clusters to classes by three different rules; the protocol's majority rule is tested
against its own reference, and the one-to-one rule against EmbedUL's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from clusterlab.data.mixing import cutmix, cutmix_box, mixup
from clusterlab.eval.knn import knn_accuracy, knn_class_scores
from clusterlab.eval.metrics import cluster_metrics, count_matrix, hungarian_mapping
from clusterlab.losses.iic import iic_loss
from clusterlab.losses.npid import nce_scores
from clusterlab.losses.scan import confident_cross_entropy, scan_loss
from clusterlab.losses.selfclassifier import self_classifier_loss
from clusterlab.methods import METHODS, Batch, DataInfo, Progress
from clusterlab.methods import npid as npid_module
from clusterlab.methods.superand import bank_entropy
from clusterlab.ops.sinkhorn import sela_sinkhorn, sinkhorn
from clusterlab.optim import LARS, Schedule
from conftest import entry_module
from dist_utils import single_thread  # noqa: F401 - autouse fixture

GOLDEN = Path(__file__).resolve().parent / "golden"
main_pretrain = entry_module("main_pretrain")
main_cluster = entry_module("main_cluster")

# The fixture families this file tests; a fixture of any other family fails test_every_fixture_is_tested, so none
# can be added without a test.
FAMILIES = ("swav_sinkhorn", "unmix_sinkhorn", "swav_loss", "unmix", "lr_schedule", "lars", "sela_sinkhorn",
            "selfclassifier_v1", "selfclassifier_v2", "npid_nce", "npid_softmax", "knn", "superand_anchors",
            "superand_step", "embedul_iic", "embedul_step", "metrics", "scan_loss", "scan_selflabel_ce")


def names(family: str) -> list[str]:
    found = sorted(p.stem for p in GOLDEN.glob(f"{family}__*.npz"))
    assert found, f"no fixture of family {family!r} in {GOLDEN}"
    return found


def load(name: str) -> tuple[dict, dict]:
    """(arrays, parameters) of a fixture; parameters are its param_* entries as Python values."""
    with np.load(GOLDEN / f"{name}.npz") as data:
        arrays = {key: data[key] for key in data.files if not key.startswith("param_")}
        params = {key[len("param_"):]: data[key].tolist() for key in data.files if key.startswith("param_")}
    return arrays, params


def tensor(array: np.ndarray, requires_grad: bool = False) -> torch.Tensor:
    return torch.from_numpy(np.array(array)).requires_grad_(requires_grad)


def check(what: str, actual, expected, atol: float) -> None:
    """Assert max |actual - expected| <= atol, and print the difference."""
    actual = np.asarray(actual.detach() if isinstance(actual, torch.Tensor) else actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    difference = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    print(f"golden {what}: max |difference| {difference:.3g} (tolerance {atol:.3g})")
    assert difference <= atol, f"{what}: max |difference| {difference:.3g} > tolerance {atol:.3g}"


def check_scaled(what: str, actual, expected, atol: float) -> None:
    """check() within max(atol, 1e-5 x the largest |expected|), for values whose float32 round-off depends on the
    order of the sums (threads, vector units): gradients, and exp(s / T) with T < 1 (NCE scores, EmbedUL's head
    probabilities), which magnifies the last bits of s. Such values differ here by up to 2.8e-7 at a largest entry
    of 0.38 (Self-Classifier v2's gradients) and 1.04e-7 at 0.25 (NCE scores), as much as upstream's own code moves
    when run with another thread count."""
    check(what, actual, expected, max(atol, 1e-5 * float(np.abs(expected).max())))


def check_equal(what: str, actual, expected) -> None:
    actual, expected = np.asarray(actual), np.asarray(expected)
    mismatches = int(np.sum(actual != expected)) if actual.shape == expected.shape else -1
    print(f"golden {what}: {mismatches} mismatches (tolerance: exact)")
    assert mismatches == 0, f"{what}: {mismatches} mismatches (shape {actual.shape} vs {expected.shape})"


def info(num_samples: int, num_classes: int = 10) -> DataInfo:
    return DataInfo(channels=1, image_size=8, num_samples=num_samples, num_classes=num_classes, mean=(0.5,),
                    std=(0.25,))


def without_backbone(method: nn.Module) -> nn.Module:
    """The method with backbone and embedding head replaced by the identity: its input is the raw embedding."""
    method.backbone = nn.Identity()
    if hasattr(method, "head"):
        method.head = nn.Identity()
    return method


def progress(epoch: int = 0, step: int = 0) -> Progress:
    return Progress(epoch=epoch, step=step, global_step=step, steps_per_epoch=1)


def batch(indices: np.ndarray, labels: np.ndarray | None = None) -> Batch:
    idx = tensor(indices).long()
    labels = tensor(labels).long() if labels is not None else torch.zeros_like(idx)
    return Batch(images=torch.zeros(len(idx), 1, 8, 8), labels=labels, indices=idx, global_size=len(idx), offset=0)


def test_every_fixture_is_tested():
    families = {p.stem.split("__")[0] for p in GOLDEN.glob("*.npz")}
    assert families == set(FAMILIES)
    assert len(list(GOLDEN.glob("*.npz"))) == sum(len(names(f)) for f in FAMILIES) == 35


# ---- Sinkhorn-Knopp (ops/sinkhorn.py) --------------------------------------------------------------------------------

SINKHORN_ATOL = 2e-6  # observed here: <= 1.3e-7


@pytest.mark.parametrize("name", names("swav_sinkhorn"))
def test_swav_sinkhorn(name):
    """SwAV's distributed_sinkhorn: our sinkhorn in float32 (the default), and in float64 against upstream's
    float64 run where the fixture has one."""
    data, p = load(name)
    scores = tensor(data["scores"])
    check(f"{name} codes", sinkhorn(scores, p["epsilon"], p["sinkhorn_iterations"]), data["codes"], SINKHORN_ATOL)
    if "codes_f64" in data:
        codes = sinkhorn(scores.double(), p["epsilon"], p["sinkhorn_iterations"], dtype=torch.float64)
        check(f"{name} codes float64", codes, data["codes_f64"], SINKHORN_ATOL)


@pytest.mark.parametrize("name", names("unmix_sinkhorn"))
def test_unmix_sinkhorn(name):
    """Un-Mix's older Sinkhorn (vector scaling, shoot_infs), with and without its max-subtraction option: both
    equal to our one sinkhorn."""
    data, p = load(name)
    codes = sinkhorn(tensor(data["scores"]), p["epsilon"], p["sinkhorn_iterations"])
    check(f"{name} codes", codes, data["codes"], SINKHORN_ATOL)
    check(f"{name} codes (numerically stable option)", codes, data["codes_stable"], SINKHORN_ATOL)


@pytest.mark.parametrize("name", names("sela_sinkhorn"))
def test_sela_sinkhorn(name):
    """SeLa's whole-dataset Sinkhorn-Knopp (CIFAR and CPU variants): the same labels and iteration count."""
    data, p = load(name)
    solution = sela_sinkhorn(tensor(data["logits"]), p["lamb"], p["tol"], p["check_every"])
    check_equal(f"{name} labels", solution.labels.numpy(), data["labels"])
    check_equal(f"{name} iterations", solution.iterations, data["iterations"])


# ---- SwAV and Un-Mix losses through the methods' forward (methods/swav.py, methods/unmix.py) -------------------------

LOSS_ATOL, GRAD_ATOL = 1e-5, 1e-7  # observed here: loss <= 1.9e-6, gradient <= 6e-8 (Self-Classifier: 2.8e-7)


def swav_method(p: dict, method: str = "swav", *flags: str) -> nn.Module:
    crops = [str(c) for c in p.get("nmb_crops", [2])]
    sizes = [str(8 // (i + 1)) for i in range(len(crops))]
    scales = ["0.5"] * len(crops)
    args = main_pretrain.parse_args([
        "--method", method, "--dataset", "digits", "--device", "cpu", "--width", "4",
        "--batch_size", str(p["batch_size"]), "--nmb_crops", *crops, "--size_crops", *sizes,
        "--min_scale_crops", *scales, "--max_scale_crops", *scales,
        "--crops_for_assign", *map(str, p["crops_for_assign"]), "--queue_length", str(p.get("queue_length", 0)),
        "--epoch_queue_starts", "0", "--feat_dim", "32", "--nmb_prototypes", str(p["nmb_prototypes"]),
        "--temperature", str(p["temperature"]), "--epsilon", str(p["epsilon"]),
        "--sinkhorn_iterations", str(p["sinkhorn_iterations"]), "--freeze_prototypes_niters", "0", *flags])
    return METHODS[method](args, info(64), torch.device("cpu"))


@pytest.mark.parametrize("name", names("swav_loss"))
def test_swav_loss_with_queue(name):
    """SwAV's training loss over several steps with fixed prototypes: queue filling and use, Sinkhorn codes of the
    assignment crops (behind the queue's scores once it is full), swapped prediction by every other crop, and the
    gradient with respect to the scores. Checked against the facebookresearch code and Un-Mix's second
    implementation of the same loss."""
    data, p = load(name)
    method = swav_method(p)
    with torch.no_grad():
        method.prototypes.weight.copy_(tensor(data["prototypes"]))
    method.on_epoch_start(0)
    b = p["batch_size"]
    dummy_crops = [torch.zeros(b, 1, 8, 8)]
    for step in range(p["steps"]):
        queue_full = method.queue is not None and method.queue.full
        check_equal(f"{name} step {step} queue used", queue_full, data["queue_used"][step])
        scores = tensor(data["scores"][step], requires_grad=True)
        method.embed = lambda crops, z=tensor(data["embeddings"][step]), s=scores: (z, s)
        loss, _ = method(dummy_crops, batch(np.arange(b)), progress(step=step))
        loss.backward()
        check(f"{name} step {step} loss", loss, data["loss"][step], LOSS_ATOL)
        check(f"{name} step {step} loss (Un-Mix implementation)", loss, data["loss_unmix_impl"][step], LOSS_ATOL)
        check_scaled(f"{name} step {step} d loss / d scores", scores.grad, data["grad_scores"][step], GRAD_ATOL)
        check_scaled(f"{name} step {step} d loss / d scores (Un-Mix implementation)", scores.grad,
                   data["grad_scores_unmix_impl"][step], GRAD_ATOL)


def upstream_unmix_draws(p: dict) -> tuple[float, float, tuple[int, int] | None]:
    """Un-Mix's draws after np.random.seed(seed): r, lam, then for CutMix the box centre along the height (dim 2)
    and the width (dim 3), in that order (rand_bbox)."""
    legacy = np.random.RandomState(p["seed"])
    r, lam = float(legacy.rand(1)[0]), float(legacy.beta(p["unmix_beta"], p["unmix_beta"]))
    if r < p["unmix_prob"]:
        return r, lam, None
    return r, lam, (int(legacy.randint(p["image_size"])), int(legacy.randint(p["image_size"])))


@pytest.mark.parametrize("name", names("unmix"))
def test_unmix_mixture_and_loss(name):
    """Un-Mix: the mixed images (global mixup, or CutMix with upstream's box), lam as the loss uses it, and the
    faithful loss (`--unmix_mode faithful`, the upstream code's; `paper` is by design another loss) with its
    gradient through Un-Mix's forward."""
    data, p = load(name)
    r, lam, centre = upstream_unmix_draws(p)
    check(f"{name} draw r", r, data["r"], 0.0)
    check(f"{name} draw lam", lam, data["lam_beta"], 0.0)
    x0 = tensor(data["x0"])
    if centre is None:
        mixture, lam_used = mixup(x0, lam), lam
    else:
        size = p["image_size"]
        top, bottom, left, right = cutmix_box(size, size, lam, *centre)
        check_equal(f"{name} CutMix box (bbx1, bby1, bbx2, bby2)", (top, left, bottom, right), data["cutmix_box"])
        mixture, lam_used = cutmix(x0, (top, bottom, left, right))
    check(f"{name} mixture", mixture, data["mixture"], 0.0)
    check(f"{name} lam used", lam_used, data["lam_used"], 0.0)

    method = swav_method(p, "unmix", "--unmix_mode", "faithful")
    with torch.no_grad():
        method.prototypes.weight.copy_(tensor(data["prototypes"]))
    scores = tensor(data["scores"], requires_grad=True)
    method.embed = lambda crops: (tensor(data["embeddings"]), scores)
    loss, _ = method(([x0, tensor(data["x1"]), mixture], lam_used), batch(np.arange(p["batch_size"])), progress())
    loss.backward()
    check(f"{name} loss (faithful)", loss, data["loss"], LOSS_ATOL)
    check_scaled(f"{name} d loss / d scores (faithful)", scores.grad, data["grad_scores"], GRAD_ATOL)


# ---- optimisation (optim.py) -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", names("lr_schedule"))
def test_cosine_schedule_with_warmup(name):
    """SwAV's (and Un-Mix's) per-iteration schedule: linear warm-up with both ends included, then cosine."""
    data, p = load(name)
    schedule = Schedule("cosine", p["base_lr"], p["epochs"], p["iters_per_epoch"], final_lr=p["final_lr"],
                        warmup_epochs=p["warmup_epochs"], start_warmup=p["start_warmup"])
    check(f"{name} lr", [schedule(t) for t in range(len(data["lr"]))], data["lr"], 1e-12)


@pytest.mark.parametrize("name", names("lars"))
def test_lars_equals_apex_larc(name):
    """Two steps of our LARS against apex's LARC(clip=False) around torch SGD with momentum and weight decay,
    including a zero parameter, a zero gradient (no adaptation, no decay) and a parameter without gradient."""
    data, p = load(name)
    params = [nn.Parameter(tensor(data[f"p{i}_init"]).clone()) for i in range(p["num_params"])]
    optimizer = LARS(params, lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"],
                     trust_coefficient=p["trust_coefficient"], eps=p["eps"])
    for step in (1, 2):
        for i, param in enumerate(params):
            key = f"p{i}_grad_step{step}"
            param.grad = tensor(data[key]).clone() if key in data else None
        optimizer.step()
        for i, param in enumerate(params):
            check(f"{name} parameter {i} after step {step}", param, data[f"p{i}_after_step{step}"], 1e-7)


# ---- class assignment: Self-Classifier (losses/selfclassifier.py) ----------------------------------------------------

@pytest.mark.parametrize("name", names("selfclassifier_v2"))
def test_selfclassifier_v2_loss(name):
    """The ECCV loss (uniform-prior normalisation, row and column temperatures, all view pairs but local-local),
    averaged over heads as the method does, and its gradient with respect to every head's and view's logits."""
    data, p = load(name)
    heads = [[tensor(data[f"logits_h{h}_v{v}"], requires_grad=True) for v in range(p["num_views"])]
             for h in range(len(p["head_sizes"]))]
    loss = torch.stack([self_classifier_loss(views, slice(None), p["row_tau"], p["col_tau"], p["num_global_views"],
                                             eps=p["eps"]) for views in heads]).mean()
    loss.backward()
    check(f"{name} loss", loss, data["loss"], LOSS_ATOL)
    for h, views in enumerate(heads):
        for v, logits in enumerate(views):
            check_scaled(f"{name} d loss / d logits head {h} view {v}", logits.grad, data[f"grad_h{h}_v{v}"],
                       GRAD_ATOL)


@pytest.mark.parametrize("name", names("selfclassifier_v1"))
def test_selfclassifier_v1_loss(name):
    """The v1 CIFAR loss: cosine logits of fixed heads over one temperature, no prior normalisation, two views;
    upstream's gradient is with respect to cos / tau, ours with respect to cos (a factor 1 / tau)."""
    data, p = load(name)
    heads = [[tensor(data[f"cos_h{h}_v{v}"], requires_grad=True) for v in range(2)] for h in range(p["heads"])]
    loss = torch.stack([self_classifier_loss(views, slice(None), p["tau"], p["tau"], 2, uniform_prior=False)
                        for views in heads]).mean()
    loss.backward()
    check(f"{name} loss", loss, data["loss"], LOSS_ATOL)
    for h, views in enumerate(heads):
        for v, cosines in enumerate(views):
            check_scaled(f"{name} d loss / d cos head {h} view {v}", cosines.grad,
                       data[f"grad_logits_h{h}_v{v}"] / p["tau"], GRAD_ATOL)


# ---- NPID through its forward, backward and bank update (methods/npid.py) -------------------------------------------

def npid_method(p: dict, nce_k: int) -> nn.Module:
    args = main_pretrain.parse_args(["--method", "npid", "--dataset", "digits", "--device", "cpu", "--width", "4",
                                     "--low_dim", str(p["D"]), "--nce_t", str(p["T"]), "--nce_m", str(p["momentum"]),
                                     "--nce_k", str(nce_k)])
    method = without_backbone(METHODS["npid"](args, info(p["N"]), torch.device("cpu")))
    return method




@pytest.mark.parametrize("name", names("npid_nce"))
def test_npid_nce_step(name, monkeypatch):
    """NCE with K noise entries (upstream's draws injected), Z estimated on this first batch, the scores
    P = exp(v . f / T) / Z, the loss, the gradient through the L2 normalisation, and the bank after the momentum
    update; duplicated indices keep the last occurrence's update, as upstream's index_copy_ does on the CPU."""
    data, p = load(name)
    method = npid_method(p, p["K"])
    with torch.no_grad():
        method.memory.weight.copy_(tensor(data["bank"]))
    method.draw_noise = lambda batch: tensor(data["noise_indices"]).long()
    seen = []
    monkeypatch.setattr(npid_module, "nce_scores", lambda *args: seen.append(nce_scores(*args)) or seen[-1])
    x = tensor(data["x"], requires_grad=True)
    loss, _ = method([x], batch(data["indices"]), progress())
    loss.backward()
    method.after_backward(progress())
    check(f"{name} Z (relative)", method.nce_z.item() / float(data["z"]), 1.0, 1e-6)
    check_scaled(f"{name} scores P", seen[0], data["scores"], 1e-7)
    check(f"{name} loss (relative)", loss.item() / float(data["loss"]), 1.0, 1e-5)
    check_scaled(f"{name} d loss / d x", x.grad, data["grad_x"], 0.0)
    check(f"{name} bank after the update", method.memory.weight, data["bank_after"], 1e-7)


@pytest.mark.parametrize("name", names("npid_softmax"))
def test_npid_softmax_step(name):
    """The full non-parametric softmax: logits f M^T / T, the loss, the gradient and the bank update."""
    data, p = load(name)
    method = npid_method(p, 0)
    with torch.no_grad():
        method.memory.weight.copy_(tensor(data["bank"]))
    x = tensor(data["x"], requires_grad=True)
    loss, _ = method([x], batch(data["indices"]), progress())
    loss.backward()
    check(f"{name} logits", method.embedding(x).detach() @ tensor(data["bank"]).t() / p["T"], data["logits"], 5e-6)
    method.after_backward(progress())
    check(f"{name} loss", loss, data["loss"], LOSS_ATOL)
    check_scaled(f"{name} d loss / d x", x.grad, data["grad_x"], 0.0)
    check(f"{name} bank after the update", method.memory.weight, data["bank_after"], 1e-7)


@pytest.mark.parametrize("name", names("knn"))
def test_weighted_knn(name):
    """NPID's weighted kNN (also Super-AND's): per-class vote sums (up to one factor per row), predictions and
    top-1."""
    data, p = load(name)
    train, train_labels = tensor(data["train_features"]), tensor(data["train_labels"]).long()
    test, test_labels = tensor(data["test_features"]), tensor(data["test_labels"]).long()
    scores = knn_class_scores(train, train_labels, test, p["num_classes"], p["K"], p["sigma"])
    expected = data["class_scores"]
    # Ours divides each row by its nearest neighbour's weight (finite at any temperature): compare row by row.
    check(f"{name} class scores (relative to each row's largest)", scores / scores.max(dim=1, keepdim=True).values,
          expected / expected.max(axis=1, keepdims=True), 1e-6)
    check_equal(f"{name} predictions", scores.argmax(dim=1).numpy(), data["predictions"])
    top1 = knn_accuracy(train, train_labels, test, test_labels, p["num_classes"], p["K"], p["sigma"])["top1"]
    check(f"{name} top-1", top1, data["top1"], 0.0)


# ---- Super-AND (methods/superand.py) ---------------------------------------------------------------------------------

def superand_method(p: dict, *flags: str) -> nn.Module:
    args = main_pretrain.parse_args(["--method", "superand", "--dataset", "digits", "--device", "cpu", "--width", "4",
                                     "--low_dim", str(p["D"]), "--npc_t", str(p["npc_T"]),
                                     "--ans_select_rate", str(p["ANs_select_rate"]), "--ans_size", str(p["ANs_size"]),
                                     *flags])
    return without_backbone(METHODS["superand"](args, info(p["N"]), torch.device("cpu")))


@pytest.mark.parametrize("name", names("superand_anchors"))
def test_superand_anchors(name):
    """Before rounds 1-4: every entry's entropy of softmax(M_i M^T / T), the int(N rate round) lowest as anchors
    (in order), each one's nearest other entry, and the anchor/neighbour label consistency, via start_round."""
    data, p = load(name)
    method = superand_method(p)
    bank = tensor(data["bank"])
    with torch.no_grad():
        method.memory.weight.copy_(bank)
        method.memory.written.fill_(True)  # a trained bank: every row written
    method.seen_labels.copy_(tensor(data["labels"]).long())
    check(f"{name} entropy", bank_entropy(bank, p["npc_T"]), data["entropy"], 2e-6)
    for number in p["rounds"]:
        method.start_round(number)
        check_equal(f"{name} round {number} anchors", method.anchors.numpy(), data[f"anchors_round{number}"])
        check_equal(f"{name} round {number} neighbours", method.neighbours[method.anchors].numpy(),
                    data[f"neighbours_round{number}"])
        check(f"{name} round {number} consistency", method.consistency, data[f"consistency_round{number}"], 0.0)


def superand_step(data: dict, p: dict, mask_own: str):
    """(method, raw embeddings x, loss, terms, progress) of one Super-AND step on the fixture's bank and anchors."""
    method = superand_method(p, "--npc_m", str(p["npc_momentum"]), "--batch_t", str(p["batch_T"]),
                             "--ue_every", str(p["ue_every"]), "--ue_weight", str(p["ue_weight_step"]),
                             "--ue_mask_own", mask_own)
    with torch.no_grad():
        method.memory.weight.copy_(tensor(data["bank"]))
    method.set_anchors(p["round"], tensor(data["anchors"]).long(), tensor(data["neighbours"]).long())
    x, b = tensor(data["x"], requires_grad=True), p["B"]
    at = progress(epoch=p["round"] * method.args.epochs_per_round + p["epoch_in_round"])
    loss, terms = method([x[:b], x[b:]], batch(data["indices"], data["labels"][data["indices"]]), at)
    return method, x, loss, terms, at


@pytest.mark.parametrize("name", names("superand_step"))
def test_superand_step(name):
    """One Super-AND step with the pinned code's losses: AND (anchors' neighbourhoods), AUG on the normalised NPC
    logit rows, UE with each row's own logit set to -10 in both views (`--ue_mask_own true`) at the weight of the
    epoch in its round; the gradient through the normalisation, and the bank update by both views. The unmasked UE
    entropy (`--ue_mask_own false`, only in super-AND's first commit) is by design another value."""
    data, p = load(name)
    method, x, loss, terms, at = superand_step(data, p, "true")
    loss.backward()
    method.after_backward(at)
    check(f"{name} AND", terms["and"], data["loss_and"], 5e-6)
    check(f"{name} AUG", terms["aug"], data["loss_aug"], 5e-6)
    check(f"{name} UE (own logit masked)", terms["ue"], data["loss_ue_masked"], 5e-6)
    check(f"{name} UE weight", terms["ue_weight"], data["ue_weight"], 0.0)
    check(f"{name} total", loss, data["loss_total"], 5e-6)
    check_scaled(f"{name} d loss / d x", x.grad, data["grad_x"], 0.0)
    check(f"{name} bank after the update", method.memory.weight, data["bank_after"], 1e-7)
    unmasked = superand_step(data, p, "false")[3]["ue"]
    assert abs(float(unmasked) - float(data["loss_ue_masked"])) > 1e-3


# ---- EmbedUL (losses/iic.py, methods/embedul.py) ---------------------------------------------------------------------

@pytest.mark.parametrize("name", names("embedul_iic"))
def test_iic_loss(name):
    """IIC's mutual-information loss with its machine-epsilon clamps (one fixture has an empty class, so
    clamped joint entries and marginals), and its gradient through the softmax."""
    data, p = load(name)
    a, b = tensor(data["logits_a"], requires_grad=True), tensor(data["logits_b"], requires_grad=True)
    loss = iic_loss(F.softmax(a, dim=1), F.softmax(b, dim=1), eps=p["EPS"])
    loss.backward()
    check(f"{name} loss", loss, data["loss"], 1e-6)
    check_scaled(f"{name} d loss / d logits_a", a.grad, data["grad_logits_a"], 1e-8)
    check_scaled(f"{name} d loss / d logits_b", b.grad, data["grad_logits_b"], 1e-8)


def embedul_method(data: dict, p: dict, head_norm: str) -> nn.Module:
    """EmbedUL with the fixture's head weights, fixed as upstream's."""
    args = main_cluster.parse_args(["--method", "embedul", "--dataset", "digits", "--device", "cpu", "--width", "4",
                                    "--low_dim", str(p["D"]), "--num_heads", str(p["num_heads"]),
                                    "--head_classes", str(p["C"]), "--head_t", str(p["head_T"]),
                                    "--batch_t", str(p["batch_T"]), "--head_norm", head_norm])
    method = without_backbone(METHODS["embedul"](args, info(64, p["C"]), torch.device("cpu")))
    with torch.no_grad():
        for weight, value in zip(method.heads, data["head_weights"]):
            weight.copy_(tensor(value))
    return method


@pytest.mark.parametrize("name", names("embedul_step"))
def test_embedul_step(name):
    """One EmbedUL stage-2 step with `--head_norm feature` (the code's normalisation of the fixed N(0, 1) heads):
    every head's probabilities, its IIC loss, the consistency loss on the embeddings, the total and its gradient.
    `--head_norm class` (the paper's) gives other probabilities by design."""
    data, p = load(name)
    method = embedul_method(data, p, "feature")
    x = tensor(data["x"], requires_grad=True)
    probs = torch.stack([F.softmax(logits, dim=1) for logits in method.head_logits(x)])
    check_scaled(f"{name} head probabilities", probs, data["head_probs"], 1e-6)
    b = p["B"]
    loss, terms = method([x[:b], x[b:]], batch(np.arange(b)), progress())
    loss.backward()
    check(f"{name} IIC per head", [terms[f"head{h}"] for h in range(p["num_heads"])], data["loss_heads"], 2e-6)
    check(f"{name} consistency loss", terms["cp"], data["loss_cp"], 2e-6)
    check(f"{name} total", loss, data["loss_total"], 2e-6)
    check_scaled(f"{name} d loss / d x", x.grad, data["grad_x"], 1e-8)
    paper = embedul_method(data, p, "class").head_logits(x.detach())
    paper_probs = torch.stack([F.softmax(logits, dim=1) for logits in paper])
    assert float((paper_probs - tensor(data["head_probs"])).abs().max()) > 1e-2


# ---- clustering metrics (eval/metrics.py) ----------------------------------------------------------------------------

def test_metrics_one_cluster_per_class():
    """K = C: Hungarian ACC as EmbedUL's evaluation computes it; NMI, AMI, ARI as scikit-learn."""
    data, p = load("metrics__k10_c10_n1000")
    metrics = cluster_metrics(data["y_true"], data["y_pred"], p["num_clusters"], p["num_classes"])
    for key in ("acc", "nmi", "ami", "ari"):
        check(f"metrics K=C {key}", metrics[key], data[key], 1e-12)


def test_metrics_over_clustering():
    """K > C: NMI, AMI, ARI as scikit-learn. ACC depends on the cluster -> class rule, and the upstream codes use
    three different ones; ours (each cluster to its majority class) is the protocol's choice and equals its
    reference exactly, while our one-to-one Hungarian map reproduces EmbedUL's ACC over a K x K count matrix."""
    data, p = load("metrics__k15_c5_n1000_overclustering")
    y_true, y_pred = data["y_true"], data["y_pred"]
    metrics = cluster_metrics(y_true, y_pred, p["num_clusters"], p["num_classes"])
    for key in ("nmi", "ami", "ari"):
        check(f"metrics K>C {key}", metrics[key], data[key], 1e-12)
    check("metrics K>C acc (majority rule)", metrics["acc"], data["acc_majority_reference"], 1e-12)
    mapping = hungarian_mapping(count_matrix(y_pred, y_true, p["num_clusters"], p["num_classes"]))
    check("metrics K>C acc (one-to-one, EmbedUL with class_num = K)", np.mean(mapping[y_pred] == y_true),
          data["acc_embedul_hungarian_classnum_K"], 1e-12)


# ---- SCAN (losses/scan.py) -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", names("scan_loss"))
def test_scan_loss(name):
    """SCANLoss on anchor and neighbour logits: the total, its two terms and the gradients (one fixture has a row
    whose similarity underflows, so BCELoss's log clamp at -100 decides it, and empty classes in the mean
    prediction, so the 1e-8 clamp of the entropy applies)."""
    data, p = load(name)
    anchors = tensor(data["anchors"], requires_grad=True)
    neighbours = tensor(data["neighbors"], requires_grad=True)
    total, consistency, entropy = scan_loss(anchors, neighbours, p["entropy_weight"])
    total.backward()
    check(f"{name} total", total, data["total"], 1e-5)
    check(f"{name} consistency", consistency, data["consistency"], 1e-5)
    check(f"{name} entropy", entropy, data["entropy"], 1e-6)
    check_scaled(f"{name} d total / d anchors", anchors.grad, data["grad_anchors"], 1e-7)
    check_scaled(f"{name} d total / d neighbours", neighbours.grad, data["grad_neighbors"], 1e-7)


@pytest.mark.parametrize("name", names("scan_selflabel_ce"))
def test_scan_selflabel_cross_entropy(name):
    """ConfidenceBasedCE: pseudo-labels of the confident weak views, class-balanced (or not) cross-entropy of the
    strong views, and its gradient."""
    data, p = load(name)
    strong = tensor(data["strong"], requires_grad=True)
    loss, _ = confident_cross_entropy(tensor(data["weak"]), strong, p["threshold"], p["balance"])
    loss.backward()
    check(f"{name} loss", loss, data["loss"], 1e-5)
    check_scaled(f"{name} d loss / d strong", strong.grad, data["grad_strong"], 1e-7)
