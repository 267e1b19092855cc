"""Super-AND (methods/superand.py, losses/superand.py, models/sobel.py).

- AND, AUG and UE losses against naive loops over the written-out formulas (1e-5); the written-out AND and UE
  gradients against autograd's chains in float64 (1e-12) and gradcheck; AND finite where the picked mass underflows;
- at UE weight 0 the UE term is logged and has no node in the step's graph; above 0 it has and adds to the gradient;
- the AUG loss on NPC logit rows computed from gathered d-dimensional keys equals the direct computation on the
  N-dimensional normalised logit rows, in value (1e-5) and in gradient (1e-4 relative);
- entropies, anchors and neighbours against brute force on a small bank, with chunks of two rows (1e-5 / exact);
- the Sobel stream: the fixed filters' output for a hand-computed impulse and ramp, grey input, no gradient,
  unchanged by an SGD step with weight decay, not parameters;
- the UE weight schedule, the defaults, `--epochs` != rounds x epochs_per_round refused;
- one Trainer step that starts round 1 (anchors found on 2 ranks, each half of the rows) on 2 gloo processes gives
  the weights, bank and anchors of 1 process (1e-5; anchors exact);
- main_pretrain.py stopped by SIGUSR2 at the last step before round 2 and again in the middle of round 2, and
  started again each time, ends bit-identical (weights, bank, optimiser, anchors) to an uninterrupted run;
- an npid checkpoint is refused by `--method superand` (exit 2, one line).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clusterlab import distributed, engine, signals
from clusterlab.data import ImageSet
from clusterlab.errors import ConfigError
from clusterlab.losses.superand import and_loss, aug_loss, ue_loss
from clusterlab.methods import METHODS, Batch, DataInfo, Progress
from clusterlab.methods.base import two_view_columns
from clusterlab.methods.superand import bank_entropy, select_anchors
from clusterlab.ops.knn import topk_neighbours
from clusterlab.models import build_backbone
from conftest import ROOT, assert_ok, assert_user_error, entry_module, run_script, script_env
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture

main_pretrain = entry_module("main_pretrain")
TINY = ["--method", "superand", "--dataset", "digits", "--width", "4", "--low_dim", "16", "--device", "cpu",
        "--seed", "3"]


def superand_args(*extra: str):
    return main_pretrain.parse_args([*TINY, *extra])


def images(n: int = 32, seed: int = 0) -> ImageSet:
    """n random grey 8 x 8 images with labels c mod 10 (no data files: the 2-process workers start faster)."""
    g = torch.Generator().manual_seed(seed)
    return ImageSet("fake", "train", torch.arange(n) % 10, 10, 1, 8, (0.5,), (0.25,), [str(c) for c in range(10)],
                    images=torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8))


def build(*extra: str, n: int = 32):
    train = images(n)
    return METHODS["superand"](superand_args(*extra), DataInfo.of(train), torch.device("cpu")), train


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# ---- losses against the formulas -------------------------------------------------------------------------------------

def softmax_row(row: list[float]) -> list[float]:
    peak = max(row)
    e = [math.exp(v - peak) for v in row]
    return [v / sum(e) for v in e]


def test_and_loss_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=g) * 5
    own = torch.tensor([0, 4, 8, 0, 4, 8])
    neighbours = torch.tensor([[-1, -1], [2, 7], [-1, -1], [-1, -1], [2, 7], [-1, -1]])  # sample 4 is an anchor
    naive = 0.0
    for i in range(6):
        p = softmax_row(logits[i].tolist())
        mass = p[own[i]] + sum(p[j] for j in neighbours[i].tolist() if j >= 0)
        naive -= math.log(mass)
    assert abs(and_loss(logits, own, neighbours).item() - naive / 6) < 1e-5


def autograd_and_loss(logits, own, neighbours):
    """The AND loss through autograd's log-softmax, gather and logsumexp (the formula in logs)."""
    log_p = F.log_softmax(logits, dim=1)
    columns = torch.cat([own[:, None], neighbours], dim=1)
    picked = log_p.gather(1, columns.clamp(min=0)).masked_fill(columns < 0, float("-inf"))
    return -torch.logsumexp(picked, dim=1).mean()


def test_and_gradient_is_autograds():
    """The written-out gradient (p - softmax over the picked columns) / R against autograd (float64, a gradient
    scaled by 0.7 on its way back, rows without neighbours, a column picked twice), and against finite
    differences; the logits are left as they were."""
    g = torch.Generator().manual_seed(8)
    logits = (torch.randn(6, 40, generator=g, dtype=torch.float64) * 4).requires_grad_()
    own = torch.tensor([3, 17, 39, 3, 17, 39])
    neighbours = torch.tensor([[-1, -1], [5, 22], [-1, -1], [-1, -1], [5, 5], [0, -1]])
    before = logits.detach().clone()
    (expected_grad,) = torch.autograd.grad(0.7 * autograd_and_loss(logits, own, neighbours), logits)
    loss = and_loss(logits, own, neighbours)
    (grad,) = torch.autograd.grad(0.7 * loss, logits)
    assert torch.allclose(loss, autograd_and_loss(logits, own, neighbours), rtol=0, atol=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=0, atol=1e-12)
    assert torch.equal(logits.detach(), before)
    assert torch.autograd.gradcheck(lambda x: and_loss(x, own, neighbours), (logits,))


def test_and_loss_stays_finite_when_the_picked_mass_underflows():
    """float32 logits 100 apart: the picked probability is about exp(-100), 0 in float32; kept in logs (as autograd's
    log-softmax was) the loss is 100 and the gradient (p - s) / R, -1/2 at the own column, 1/2 at the winning one."""
    logits = torch.zeros(2, 5)
    logits[:, 4] = 100.0
    own, neighbours = torch.tensor([0, 1]), torch.tensor([[-1], [-1]])
    logits.requires_grad_()
    loss = and_loss(logits, own, neighbours)
    loss.backward()
    assert abs(loss.item() - 100.0) < 1e-4
    assert torch.allclose(logits.grad[0], torch.tensor([-0.5, 0, 0, 0, 0.5]), atol=1e-6)


def test_and_loss_of_bfloat16_logits_under_autocast_is_float32():
    """bfloat16 logits under an enabled bfloat16 autocast: the loss is the float32 loss of the upcast logits, and
    the gradient is the float32 gradient, returned in bfloat16."""
    g = torch.Generator().manual_seed(9)
    logits = (torch.randn(4, 50, generator=g) * 5).bfloat16().requires_grad_()
    own, neighbours = torch.tensor([1, 2, 1, 2]), torch.tensor([[7], [-1], [7], [-1]])
    upcast = logits.detach().float().requires_grad_()
    expected = and_loss(upcast, own, neighbours)
    (expected_grad,) = torch.autograd.grad(expected, upcast)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = and_loss(logits, own, neighbours)
        (grad,) = torch.autograd.grad(loss, logits)
    assert loss.dtype == torch.float32 and torch.equal(loss, expected)
    assert grad.dtype == torch.bfloat16 and torch.equal(grad, expected_grad.bfloat16())


def naive_aug(x: torch.Tensor, t: float) -> float:
    """ISIF with batch_m = 1 over 2B rows [view 1; view 2], written out per pair."""
    rows, half = x.shape[0], x.shape[0] // 2
    total = 0.0
    for i in range(rows):
        partner = (i + half) % rows
        a = {j: math.exp(float(x[i] @ x[j]) / t) for j in range(rows) if j != i}
        d = sum(a.values())
        total += math.log(a[partner] / d)
        total += sum(math.log(1 - a[j] / d) for j in a if j != partner)
    return -total / rows


def test_aug_loss_matches_the_formula():
    x = unit_rows(8, 5, 1)
    own = torch.arange(8)
    # (float32 against float64: a few units in the last place of a sum of eight rows' logarithms)
    assert aug_loss(x @ x.t(), own, (own + 4) % 8, 0.1).item() == pytest.approx(naive_aug(x, 0.1), rel=3e-6)


def test_aug_loss_at_a_small_temperature_is_finite_and_exact():
    """exp(s / T) overflowed float32 from T below 1/88 (`--batch_t 0.01`: the loss was NaN at the first step);
    the row's shift cancels in every probability, so float32 equals float64 as at any temperature."""
    g = torch.Generator().manual_seed(3)
    x = F.normalize(1.0 + 0.1 * torch.randn(8, 5, generator=g), dim=1)  # alike, as a young network's features
    own = torch.arange(8)
    for temperature in (0.01, 0.005):
        small = aug_loss(x @ x.t(), own, (own + 4) % 8, temperature)
        exact = aug_loss((x @ x.t()).double(), own, (own + 4) % 8, temperature)
        assert torch.isfinite(small) and small.item() == pytest.approx(exact.item(), rel=1e-5), temperature
    # similarities computed in bf16 (under autocast) are taken in float32, as before the shift
    half = aug_loss((x @ x.t()).bfloat16(), own, (own + 4) % 8, 0.1)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(
        aug_loss((x @ x.t()).bfloat16().float(), own, (own + 4) % 8, 0.1).item(), rel=1e-6)


@pytest.mark.parametrize("masked", [True, False])
def test_ue_loss_matches_the_formula(masked):
    g = torch.Generator().manual_seed(2)
    logits, own = torch.randn(4, 7, generator=g) * 3, torch.tensor([1, 5, 1, 5])
    naive = 0.0
    for i in range(4):
        row = logits[i].tolist()
        if masked:
            row[own[i]] = -10.0
        naive -= sum(q * math.log(q) for q in softmax_row(row))
    assert abs(ue_loss(logits, own if masked else None).item() - naive / 4) < 1e-5


@pytest.mark.parametrize("masked", [True, False])
def test_ue_gradient_is_autograds(masked):
    """The written-out gradient against autograd through masking, log-softmax and q log q (float64, a gradient
    scaled by 0.7 on its way back, an own column repeated), and against finite differences; the logits are
    left as they were."""
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(5, 30, generator=g, dtype=torch.float64) * 4).requires_grad_()
    own = torch.tensor([3, 29, 3, 0, 12]) if masked else None
    before = logits.detach().clone()
    masked_logits = logits.scatter(1, own[:, None], -10.0) if masked else logits
    log_q = F.log_softmax(masked_logits, dim=1)
    expected = -(log_q.exp() * log_q).sum(dim=1).mean()
    (expected_grad,) = torch.autograd.grad(0.7 * expected, logits)
    loss = ue_loss(logits, own)
    (grad,) = torch.autograd.grad(0.7 * loss, logits)
    assert torch.allclose(loss, expected, rtol=0, atol=1e-12)
    assert torch.allclose(grad, expected_grad, rtol=0, atol=1e-12)
    assert torch.equal(logits.detach(), before)
    assert torch.autograd.gradcheck(lambda x: ue_loss(x, own), (logits,))


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """The names of the autograd nodes that `tensor`'s backward pass would run."""
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("epoch,weight", [(0, 0.0), (80, 0.2)])
def test_ue_is_differentiated_only_at_a_weight_above_zero(epoch, weight):
    """At weight 0 (epochs 0-79 of a round) the logged UE value is the loss's, the step's graph holds no UE node and
    its gradient is AND's + AUG's; at 0.2 (epoch 80) the UE node is in the graph and the gradient adds 0.2 UE's."""
    method, _ = build("--npc_t", "0.1", n=40)
    method.memory.weight.copy_(unit_rows(40, 16, 3))
    method.train()
    x = unit_rows(10, 16, 4).requires_grad_()
    method.backbone = method.head = torch.nn.Identity()  # the input rows are the (unit) embeddings
    batch = Batch(torch.zeros(5, 1, 8, 8, dtype=torch.uint8), torch.arange(5), torch.tensor([0, 7, 9, 30, 39]), 5, 0)
    loss, terms = method([x[:5], x[5:]], batch, Progress(epoch, 0, 0, 1))
    assert ("_UnificationEntropyBackward" in graph_nodes(loss)) == (weight > 0)
    (grad,) = torch.autograd.grad(loss, x)
    own, f = batch.indices.repeat(2), F.normalize(x, dim=1)  # the embedding's normalisation, in the graph
    logits = f @ method.memory_bank.t() / 0.1
    expected = and_loss(logits, own, method.neighbours[own]) + aug_loss(
        method.batch_similarities(f), *two_view_columns(5, x.device), 0.1) + weight * ue_loss(logits, own)
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert terms["ue_weight"] == pytest.approx(weight)
    assert abs(float(terms["ue"]) - float(ue_loss(logits, own).detach())) < 1e-6
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_aug_on_logits_from_gathered_keys_equals_the_direct_computation():
    """x_i = O_i / |O_i| with O = f M^T / t (N entries): the method's f_i G f_j / (t^2 |O_i| |O_j|) through the
    bank's Gram matrix G = M^T M matches x_i . x_j, and the loss's gradient with respect to f matches upstream's
    x @ x.detach()^T; half the bank's rows are its initial, un-normalised ones."""
    method, _ = build("--npc_t", "0.1", n=40)
    method.memory.weight[:20].copy_(unit_rows(20, 16, 3))
    n = 5
    f = unit_rows(2 * n, 16, 4).requires_grad_()
    logits = f @ method.memory_bank.t() / 0.1
    ours = method.batch_similarities(f)
    x = F.normalize(logits, dim=1)
    direct = x @ x.detach().t()
    torch.testing.assert_close(ours, direct, rtol=0, atol=1e-5)
    own, partner = two_view_columns(n, f.device)
    grad_ours, = torch.autograd.grad(aug_loss(ours, own, partner, 0.1), f, retain_graph=True)
    grad_direct, = torch.autograd.grad(aug_loss(direct, own, partner, 0.1), f)
    torch.testing.assert_close(grad_ours, grad_direct, rtol=1e-4, atol=1e-6)


# ---- anchors and neighbours against brute force ---------------------------------------------------------------------

def test_entropy_anchors_and_neighbours_match_brute_force():
    bank = unit_rows(30, 5, 5) * 1.3  # any rows: the bank's first rows are not normalised
    t = 0.2
    brute_entropy = []
    for i in range(30):
        p = softmax_row([float(bank[i] @ bank[j]) / t for j in range(30)])
        brute_entropy.append(-sum(q * math.log(q) for q in p))
    entropy = bank_entropy(bank, t, chunk_elements=60)  # two rows per chunk
    torch.testing.assert_close(entropy, torch.tensor(brute_entropy), rtol=0, atol=1e-5)
    anchors = select_anchors(entropy, 12)
    assert anchors.tolist() == sorted(range(30), key=lambda i: brute_entropy[i])[:12]
    neighbours = topk_neighbours(bank[anchors], bank, 2, exclude=anchors, chunk_elements=60).indices
    for a, found in zip(anchors.tolist(), neighbours.tolist()):
        ranked = sorted((j for j in range(30) if j != a), key=lambda j: -float(bank[a] @ bank[j]))
        assert found == ranked[:2]


def test_rows_no_step_wrote_are_anchors_last():
    """Full batches leave the first epoch's remainder out: those rows keep their random values, nearly orthogonal to
    the trained rows, so their softmax is peaked and their entropy among the lowest. They come after every written
    row (at round 4 every row is an anchor)."""
    method, _ = build("--ans_select_rate", "0.25", "--rounds", "5", "--epochs_per_round", "1", "--epochs", "5",
                      "--schedule_period", "1")
    bank = unit_rows(32, 16, 6)
    method.memory.weight.copy_(bank)
    method.memory.written.fill_(True)
    method.memory.written[[3, 17]] = False
    method.memory.weight[[3, 17]] = bank[[3, 17]] * 1.5  # nothing written: longer rows, sharper softmax
    entropy = bank_entropy(method.memory_bank, 0.1)
    assert set(select_anchors(entropy, 2).tolist()) == {3, 17}
    method.on_epoch_start(2)  # round 2: 16 anchors
    assert not {3, 17} & set(method.anchors.tolist())
    assert torch.equal(method.anchors, select_anchors(entropy.masked_fill(~method.memory.written, float("inf")), 16))
    method.on_epoch_start(4)
    assert method.anchors[-2:].tolist() == [3, 17]


def test_ties_in_entropy_go_to_the_lower_index():
    assert select_anchors(torch.tensor([0.5, 0.2, 0.5, 0.2, 0.1]), 4).tolist() == [4, 1, 3, 0]


def test_start_round_uses_the_rate_and_fills_the_neighbour_table():
    method, train = build("--ans_select_rate", "0.25", "--rounds", "5", "--epochs_per_round", "200")
    method.memory.weight.copy_(unit_rows(32, 16, 6))
    method.memory.written.fill_(True)
    method.seen_labels.copy_(train.labels)
    method.on_epoch_start(400)  # round 2: int(32 * 0.25 * 2) = 16 anchors
    assert method.round == 2 and len(method.anchors) == 16
    expected = select_anchors(bank_entropy(method.memory_bank, 0.1), 16)
    assert torch.equal(method.anchors, expected)
    is_anchor = torch.zeros(32, dtype=torch.bool)
    is_anchor[method.anchors] = True
    assert (method.neighbours[~is_anchor] == -1).all() and (method.neighbours[is_anchor] >= 0).all()
    labels = train.labels
    agree = (labels[method.anchors] == labels[method.neighbours[method.anchors, 0]]).float().mean().item()
    assert method.consistency == pytest.approx(agree)
    method.on_epoch_start(401)  # same round: nothing recomputed
    assert torch.equal(method.anchors, expected)
    method.on_epoch_start(800)  # round 4: all samples
    assert len(method.anchors) == 32


# ---- the Sobel two-stream backbone ----------------------------------------------------------------------------------

def test_sobel_filters_on_an_impulse_and_a_ramp():
    model = build_backbone("resnet18_sobel", 3, 4)
    impulse = torch.zeros(1, 3, 5, 5)
    impulse[0, :, 2, 2] = torch.tensor([6.0, -3.0, 0.0])  # channel mean 1
    out = model.edge_input(impulse)
    # The filters are correlated with the image, so an impulse shows each kernel rotated by 180 degrees.
    expected_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    expected_y = torch.tensor([[-1.0, -2, -1], [0, 0, 0], [1, 2, 1]])
    torch.testing.assert_close(out[0, 0, 1:4, 1:4], expected_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 1, 1:4, 1:4], expected_y, rtol=0, atol=1e-6)
    assert out[0, :, [0, 4]].abs().max() == 0 and out[0, :, :, [0, 4]].abs().max() == 0
    # A horizontal ramp I(y, x) = x: Sobel x = (x - 1) - (x + 1) weighted 1 + 2 + 1 = -8 inside, Sobel y = 0.
    ramp = torch.arange(6.0).expand(1, 3, 6, 6).clone()
    out = model.edge_input(ramp)
    assert torch.equal(out[0, 0, 1:-1, 1:-1], torch.full((4, 4), -8.0))
    assert torch.equal(out[0, 1, 1:-1, 1:-1], torch.zeros(4, 4))


def test_sobel_backbone_shapes_and_grey_input():
    colour, grey = build_backbone("resnet18_sobel", 3, 4), build_backbone("resnet18_sobel", 1, 4)
    assert colour.out_dim == grey.out_dim == 64
    with torch.no_grad():
        assert colour.eval()(torch.randn(2, 3, 8, 8)).shape == (2, 64)
        assert grey.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 64)
    x = torch.rand(1, 1, 6, 6)
    torch.testing.assert_close(grey.edge_input(x), colour.edge_input(x.expand(1, 3, 6, 6)), rtol=0, atol=1e-6)


def test_sobel_filters_are_fixed():
    model = build_backbone("resnet18_sobel", 3, 4)
    fixed = {name: buffer.clone() for name, buffer in model.named_buffers() if name in ("average", "sobel")}
    assert set(fixed) == {"average", "sobel"}
    assert not any(p is model.sobel or p is model.average for p in model.parameters())
    assert "sobel" not in model.state_dict() and "average" not in model.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=0.1)
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    assert model.edges.conv1.weight.grad.abs().max() > 0  # the edge stream does learn
    assert not model.sobel.requires_grad and model.sobel.grad is None
    optimizer.step()
    for name, value in fixed.items():
        assert torch.equal(getattr(model, name), value)


# ---- schedule, defaults, configuration errors ----------------------------------------------------------------------

def test_ue_weight_steps_every_80_epochs_of_a_round():
    method, train = build()
    method.eval()
    batch = Batch(train.images[:4], train.labels[:4], torch.arange(4), 4, 0)
    crops = method.prepare(batch)
    weights = {epoch: method(crops, batch, Progress(epoch, 0, 0, 1))[1]["ue_weight"]
               for epoch in (0, 79, 80, 159, 160, 199, 200, 280, 999)}
    assert weights == pytest.approx({0: 0.0, 79: 0.0, 80: 0.2, 159: 0.2, 160: 0.4, 199: 0.4, 200: 0.0, 280: 0.2,
                                     999: 0.4})


def test_defaults_follow_the_cifar_recipe():
    args = superand_args()
    expected = {"arch": "resnet18_sobel", "optimizer": "sgd", "nesterov": True, "lr": 0.03, "momentum": 0.9,
                "weight_decay": 5e-4, "schedule": "step", "lr_drops": [120, 160], "schedule_period": 200,
                "epochs": 1000, "rounds": 5, "epochs_per_round": 200, "batch_size": 128, "nmb_crops": [2],
                "min_scale_crops": [0.2], "max_scale_crops": [1.0], "brightness": 0.4, "contrast": 0.4,
                "saturation": 0.4, "hue": 0.4, "jitter_p": 1.0, "grey_p": 0.2, "flip_p": 0.5, "blur_p": 0.0,
                "bank_t": 0.1, "bank_m": 0.5, "batch_t": 0.1, "ans_select_rate": 0.25, "ans_size": 1,
                "aug_on": "logits", "ue_weight": 0.2, "ue_every": 80}
    assert {k: getattr(args, k) for k in expected} == expected


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("superand_*.yaml")))
def test_recipes_parse_and_build(recipe):
    """Each recipe passes the method's checks (epochs = rounds x epochs_per_round, the per-round schedule)."""
    args = main_pretrain.parse_args(["--config", str(ROOT / "configs" / recipe), "--width", "4", "--device", "cpu"])
    assert args.method == "superand" and args.arch == "resnet18_sobel"
    channels = 1 if args.dataset == "fashion_mnist" else 3
    info = DataInfo(channels, 32, 5000, 10, (0.5,) * channels, (0.25,) * channels)
    method = METHODS["superand"](args, info, torch.device("cpu"))
    assert method.memory_bank.shape == (5000, args.embed_dim)


@pytest.mark.parametrize("flags,words", [
    (["--epochs", "999"], ["--epochs 999", "--rounds 5", "--epochs_per_round 200", "1000"]),
    (["--rounds", "3", "--epochs_per_round", "2", "--epochs", "6"], ["--schedule_period 200", "--epochs_per_round 2"]),
    (["--nmb_crops", "3"], ["--nmb_crops"]),
    (["--npc_m", "-0.1"], ["--bank_m -0.1"]),
])
def test_bad_flags_are_refused(flags, words):
    with pytest.raises(ConfigError) as error:
        build(*flags)
    for word in words:
        assert word in str(error.value)


# ---- one Trainer step that starts round 1: 2 processes = 1 process --------------------------------------------------

BATCH = 16
RUNS = {"logits": ["--aug_on", "logits"], "embedding": ["--aug_on", "embedding"]}


def superand_step(output_dir: Path, extra: list[str]) -> dict:
    # epoch 4 of rounds of 3 epochs: round 1 starts here (anchors from the initial bank), in-round epoch 1 gives
    # the UE weight 0.2 with --ue_every 1.
    args = superand_args(*extra, "--batch_size", str(BATCH), "--rounds", "2", "--epochs_per_round", "3",
                         "--epochs", "6", "--schedule_period", "3", "--ue_every", "1", "--ans_select_rate", "0.5",
                         "--lr", "0.1", "--output_dir", str(output_dir), "--log_every", "100")
    ctx = distributed.init(args.device)
    engine.seed_everything(args.seed)
    train = images(BATCH)  # one global batch: one step
    method = METHODS["superand"](args, DataInfo.of(train), ctx.device)
    output_dir.mkdir(parents=True, exist_ok=True)
    trainer = engine.Trainer(method, args, ctx, output_dir, train)
    start = {k: v.detach().clone() for k, v in method.state_dict().items()}
    trainer.train_one_epoch(4)
    return {"start": start, "model": {k: v.detach().clone() for k, v in method.state_dict().items()},
            "anchors": method.extra_state(), "log": (output_dir / "train_log.jsonl").read_text() if ctx.is_main
            else ""}


def _superand_worker(rank, world, tmp):
    return {name: superand_step(Path(tmp) / f"{name}_w{world}", extra) for name, extra in RUNS.items()}


def test_trainer_step_on_two_processes_equals_one_process(tmp_path):
    two = run_distributed(_superand_worker, 2, str(tmp_path))
    for name, extra in RUNS.items():
        one = superand_step(tmp_path / f"{name}_w1", extra)
        assert one["anchors"]["round"] == 1 and len(one["anchors"]["anchors"]) == BATCH // 2
        record = json.loads(one["log"].splitlines()[0])
        assert record["ue_weight"] == pytest.approx(0.2) and record["ue"] > 0 and record["round"] == 1
        for rank in range(2):
            got = two[rank][name]
            for key, value in one["model"].items():
                assert (got["model"][key].double() - value.double()).abs().max() < 1e-5, (name, key)
            for key in ("round", "anchors", "neighbours"):
                assert torch.equal(torch.as_tensor(got["anchors"][key]), torch.as_tensor(one["anchors"][key]))
        assert not torch.allclose(one["model"]["memory.weight"], one["start"]["memory.weight"])
        assert (one["model"]["head.weight"] - one["start"]["head.weight"]).abs().max() > 1e-4
        assert torch.equal(one["model"]["seen_labels"], torch.arange(BATCH) % 10)


# ---- main_pretrain.py: pre-empted before and inside round 2, resumed bit for bit -------------------------------------

RESUME = [*TINY, "--batch_size", "64", "--rounds", "3",
          "--epochs_per_round", "2", "--epochs", "6", "--schedule_period", "2", "--lr_drops", "1", "--ue_every", "1",
          "--size_crops", "8", "--log_every", "100"]
STEPS_PER_EPOCH = 898 // 64
# Sends SIGUSR2 to itself before step STEP of epoch EPOCH, then runs main_pretrain.py as `python main_pretrain.py`.
STOPPER = """
import os, runpy, signal, sys
from clusterlab.methods.superand import SuperAND
epoch, step = int(sys.argv[1]), int(sys.argv[2])
sys.argv = sys.argv[3:]
original = SuperAND.before_step
def before_step(self, progress):
    if (progress.epoch, progress.step) == (epoch, step):
        os.kill(os.getpid(), signal.SIGUSR2)
    original(self, progress)
SuperAND.before_step = before_step
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def stop_at(epoch: int, step: int, run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STOPPER, str(epoch), str(step), str(ROOT / "main_pretrain.py"),
                           *RESUME, "--output_dir", str(run_dir)], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=180)


def test_resume_before_and_inside_round_2_is_bit_identical(tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "interrupted"
    assert_ok(run_script("main_pretrain.py", *RESUME, "--output_dir", reference))
    # (3, last step): saved at the end of round 1, so round 2's anchors are found after the restart;
    # (4, 5): saved in the middle of round 2's first epoch, so its anchors come from the checkpoint.
    for epoch, step, saved in ((3, STEPS_PER_EPOCH - 1, (4, 0)), (4, 5, (4, 6))):
        stopped = stop_at(epoch, step, run)
        assert stopped.returncode == signals.EXIT_REQUEUE, stopped.stderr[-2000:]
        status = json.loads((run / "status.json").read_text())
        assert (status["state"], status["epoch"], status["step"]) == ("interrupted", *saved)
    assert_ok(run_script("main_pretrain.py", *RESUME, "--output_dir", run))
    ours = torch.load(run / "checkpoint.pth", weights_only=True)
    theirs = torch.load(reference / "checkpoint.pth", weights_only=True)
    assert ours["global_step"] == theirs["global_step"] == 6 * STEPS_PER_EPOCH
    assert ours["model"].keys() == theirs["model"].keys() and "memory.weight" in ours["model"]
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
    assert ours["method_state"]["round"] == theirs["method_state"]["round"] == 2
    assert len(theirs["method_state"]["anchors"]) == int(898 * 0.25 * 2)
    for key in ("anchors", "neighbours"):
        assert torch.equal(ours["method_state"][key], theirs["method_state"][key]), key
    # The round's label consistency, measured when it started, is logged alike (a resume does not measure it again).
    assert ours["method_state"]["consistency"] == theirs["method_state"]["consistency"]

    def epoch_ends(run_dir):
        return [r for r in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines())
                if r.get("epoch_end")]
    assert [{k: v for k, v in r.items() if k.endswith("_mean")} for r in epoch_ends(run)] == \
        [{k: v for k, v in r.items() if k.endswith("_mean")} for r in epoch_ends(reference)]
    for p, state in theirs["optimizer"]["state"].items():
        assert torch.equal(ours["optimizer"]["state"][p]["momentum_buffer"], state["momentum_buffer"])


def test_npid_checkpoint_is_refused_by_superand(tmp_path):
    npid = ["--method", "npid", "--dataset", "digits", "--width", "4", "--batch_size", "64", "--epochs", "1",
            "--device", "cpu", "--output_dir", tmp_path]
    assert_ok(run_script("main_pretrain.py", *npid))
    refused = run_script("main_pretrain.py", *RESUME, "--output_dir", tmp_path)
    assert_user_error(refused, "main_pretrain.py", "npid", "superand")

