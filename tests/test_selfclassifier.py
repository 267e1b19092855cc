"""Self-Classifier (losses/selfclassifier.py, methods/selfclassifier.py): the v2 and v1 losses and their gradients
against a naive loop form under autograd, the loss over 2 gloo processes against 1, the heads, the MLP, the
nearest-neighbour queue, and an end-to-end run.

Tolerances: the loss runs in float32 and the naive form in float64, so values and gradients agree to 1e-5
absolute (on logits of order 1 and losses of order log C); 2 processes against 1: 1e-6.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from clusterlab import checkpoint
from clusterlab.errors import ConfigError
from clusterlab.eval.features import load_run
from clusterlab.losses.selfclassifier import self_classifier_loss, view_pairs
from clusterlab.methods import DataInfo
from clusterlab.methods.base import Batch, Progress
from clusterlab.methods.selfclassifier import NormalizedClassifier, SelfClassifier, gather_views, mlp_head
from clusterlab.ops.neighbour_queue import NearestNeighbourQueue
from conftest import ROOT, assert_ok, entry_module, run_script
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture

MAIN = entry_module("main_cluster")
CPU = torch.device("cpu")
INFO = DataInfo(1, 8, 64, 10, (0.5,), (0.25,))


def naive_loss(views, rows, row_tau, col_tau, num_global, uniform_prior, eps=1e-12):
    """Upstream's loss (src/loss.py of self-classifier@3935138 for v2, @635972b for v1) written element by element: every softmax and normalisation as an explicit sum; the L1
    normalisations divide by max(sum, eps) as upstream's F.normalize does."""
    samples, classes = views[0].shape
    total, terms = 0.0, 0
    for i in range(len(views)):
        for j in range(len(views)):
            if i == j or (i >= num_global and j >= num_global):
                continue
            s_i, s_j = views[i], views[j]
            term = 0.0
            for n in rows:
                column = [torch.exp(s_i[n, c] / col_tau) / sum(torch.exp(s_i[m, c] / col_tau) for m in range(samples))
                          for c in range(classes)]
                target = [value / max(sum(column), eps) for value in column]

                def p(m, c):
                    return torch.exp(s_j[m, c] / row_tau) / sum(torch.exp(s_j[m, k] / row_tau) for k in range(classes))

                for c in range(classes):
                    if uniform_prior:
                        column_sum = max(sum(p(m, c) for m in range(samples)), eps)
                        prediction = torch.log(samples / classes * p(n, c) / column_sum + eps)
                    else:
                        prediction = torch.log(p(n, c))
                    term = term - target[c] * prediction
            total = total + term / len(rows)
            terms += 1
    return total / terms


def random_views(count, samples=6, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(samples, classes, generator=g) for _ in range(count)]


def test_view_pairs_leave_out_local_local():
    assert len(view_pairs(8, 2)) == 26
    assert view_pairs(2, 2) == [(0, 1), (1, 0)]
    assert (2, 3) not in view_pairs(4, 2) and (0, 3) in view_pairs(4, 2) and (3, 1) in view_pairs(4, 2)


@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("rows", [slice(0, 6), slice(2, 5)])
def test_loss_and_gradient_match_the_naive_form(version, rows):
    if version == "v2":  # 2 global + 2 local views, two temperatures, uniform prior
        views, taus, num_global, prior = random_views(4), (0.1, 0.05), 2, True
    else:  # v1: 2 views, one temperature, no prior
        views, taus, num_global, prior = random_views(2, seed=1), (0.3, 0.3), 2, False
    leaves = [v.clone().requires_grad_() for v in views]
    loss = self_classifier_loss(leaves, rows, *taus, num_global=num_global, uniform_prior=prior)
    loss.backward()
    reference_leaves = [v.double().requires_grad_() for v in views]
    reference = naive_loss(reference_leaves, range(6)[rows], *taus, num_global, prior)
    reference.backward()
    assert loss.dtype == torch.float32
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), abs=1e-5)
    for mine, theirs in zip(leaves, reference_leaves):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, rtol=0, atol=1e-5)
    # No stop-gradient: the target side receives gradient too (view 2 is only a target of the global views).
    assert reference_leaves[-1].grad.abs().sum() > 0


def test_v1_loss_is_half_the_two_cross_entropies():
    a, b = random_views(2, samples=5, classes=3, seed=2)
    tau = 0.3

    def ce(target_logits, prediction_logits):
        target = torch.softmax(target_logits / tau, dim=0)
        target = target / target.sum(1, keepdim=True)
        return -(target * torch.log_softmax(prediction_logits / tau, dim=1)).sum() / len(target)

    loss = self_classifier_loss([a, b], slice(0, 5), tau, tau, uniform_prior=False)
    assert float(loss) == pytest.approx(float(0.5 * (ce(a, b) + ce(b, a))), abs=1e-6)


def test_uniform_logits_give_log_c():
    """Equal logits: targets uniform over classes, prior-normalised predictions N/C * 1/N, so each term is log C."""
    views = [torch.zeros(6, 5) for _ in range(3)]
    assert float(self_classifier_loss(views, slice(0, 6), 0.1, 0.05)) == pytest.approx(math.log(5), abs=1e-6)


# ---- 2 processes: the logits gathered with gradients ---------------------------------------------------------------

def head_outputs(local, views, sizes):
    """(V n) x C_h outputs of each head for `local` (n samples per view)."""
    g = torch.Generator().manual_seed(3)
    full = [torch.randn(views * 8, c, generator=g) for c in sizes]  # 8 global samples
    rows = torch.cat([torch.arange(v * 8, (v + 1) * 8)[local] for v in range(views)])
    return [x[rows].clone().requires_grad_() for x in full]


def losses_of(outputs, views, rows):
    per_head = [self_classifier_loss(v, rows, 0.1, 0.05, num_global=2) for v in gather_views(outputs, views)]
    return torch.stack(per_head).mean()


def _loss_worker(rank, world):
    local = slice(rank * 4, rank * 4 + 4)
    outputs = head_outputs(local, 3, (5, 7))
    loss = losses_of(outputs, 3, slice(rank * 4, rank * 4 + 4))
    loss.backward()
    return {"loss": loss.detach(), "grads": [x.grad for x in outputs]}


def test_two_processes_equal_one_process_values_and_gradients():
    results = run_distributed(_loss_worker, 2)
    outputs = head_outputs(slice(0, 8), 3, (5, 7))
    loss = losses_of(outputs, 3, slice(0, 8))
    loss.backward()
    # The global loss is the mean of the ranks' losses (equal shares); DDP averages the gradients over 2 ranks.
    assert float(loss.detach()) == pytest.approx(float(sum(r["loss"] for r in results) / 2), abs=1e-6)
    for rank, result in enumerate(results):
        rows = torch.cat([torch.arange(v * 8, (v + 1) * 8)[rank * 4: rank * 4 + 4] for v in range(3)])
        for mine, full in zip(result["grads"], outputs):
            torch.testing.assert_close(mine / 2, full.grad[rows], rtol=0, atol=1e-6)


# ---- model parts -----------------------------------------------------------------------------------------------------

def sc_args(*extra):
    return MAIN.parse_args(["--method", "selfclassifier", "--dataset", "digits", "--arch", "resnet18_cifar",
                            "--width", "4", "--device", "cpu", "--dim", "16", "--hidden_dim", "32", "--batch_size",
                            "16", *map(str, extra)])


def test_weight_normalised_heads_start_with_unit_gain_and_train():
    method = SelfClassifier(sc_args("--cls_size", 10, 20), INFO, CPU)
    assert method.head_sizes == [10, 20]
    for head in method.heads:
        assert torch.equal(head.weight_g, torch.ones_like(head.weight_g))
        assert head.weight_v.requires_grad and head.weight_g.requires_grad
        z = nn.functional.normalize(torch.randn(3, 16), dim=1)
        cosines = z @ nn.functional.normalize(head.weight_v, dim=1).t()
        torch.testing.assert_close(head(z), cosines)


@pytest.mark.parametrize("queue_length, epochs, note", [
    # batch 16: a queue of 64 is full after 4 steps and replaces view 1 from the 5th on
    (64, 1, "it is full after 4 iterations (--queue_length 64 / batch 16), the run has 4"),
    (64, 2, None),
    (72, 1, "it is full after 5 iterations"),  # the 5th push fills it
    (0, 1, None),
])
def test_a_nearest_neighbour_queue_that_never_fills_is_told(queue_length, epochs, note):
    method = SelfClassifier(sc_args("--queue_length", queue_length, "--epochs", epochs), INFO, CPU)
    notes = method.whole_run_settings(4)  # 4 steps an epoch
    assert notes == [] if note is None else (len(notes) == 1 and note in notes[0]), notes


def one_step(method):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    batch = Batch(images, torch.zeros(16, dtype=torch.long), torch.arange(16), 16, 0)
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    loss, _ = method(method.prepare(batch), batch, Progress(0, 0, 0, 1))
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("flags,frozen", [(("--fixed_cls", "true"), True), ((), False),
                                          (("--sc_version", "v1", "--row_tau", 0.3, "--col_tau", 0.3), True)])
def test_fixed_heads_do_not_change(flags, frozen):
    method = SelfClassifier(sc_args("--cls_size", 6, "--num_cls", 3, *flags), INFO, CPU)
    heads = {k: v.clone() for k, v in method.heads.state_dict().items()}
    backbone = method.backbone.conv1.weight.clone()
    assert all(p.requires_grad != frozen for p in method.heads.parameters())
    one_step(method)
    assert not torch.equal(method.backbone.conv1.weight, backbone)
    unchanged = all(torch.equal(v, heads[k]) for k, v in method.heads.state_dict().items())
    assert unchanged == frozen


def test_v1_heads_are_orthonormal():
    method = SelfClassifier(sc_args("--sc_version", "v1", "--row_tau", 0.3, "--col_tau", 0.3, "--cls_size", 12,
                                    "--num_cls", 2), INFO, CPU)
    for head in method.heads:
        w = head.weight_v
        torch.testing.assert_close(w @ w.t(), torch.eye(12), rtol=0, atol=1e-5)
    q = NormalizedClassifier(4, 10, orthogonal=True).weight_v  # more classes than dimensions: orthonormal columns
    torch.testing.assert_close(q.t() @ q, torch.eye(4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("flags,words", [
    (("--sc_version", "v1"), "--row_tau"),
    (("--cls_size", 10, 20, "--num_cls", 3), "--num_heads 3"),
    (("--nmb_crops", 1), "--nmb_crops"),
    (("--queue_len", 8), "--queue_length 8"),
])
def test_bad_values_name_the_flag(flags, words):
    with pytest.raises(ConfigError, match=words):
        SelfClassifier(sc_args(*flags), INFO, CPU)


@pytest.mark.parametrize("num_hidden,bn,leaky,kinds", [
    (0, True, True, []),
    (1, True, True, [nn.Linear]),
    (2, True, True, [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Linear]),
    (3, False, False, [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]),
])
def test_mlp_head_layout(num_hidden, bn, leaky, kinds):
    head = mlp_head(64, 256, 32, num_hidden, bn, leaky)
    assert [type(m) for m in head.modules() if not isinstance(m, (nn.Sequential, nn.Identity))] == kinds
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if linears:
        assert 0.015 < linears[0].weight.std() < 0.025 and all(torch.equal(m.bias, torch.zeros_like(m.bias))
                                                                 for m in linears)


def test_embedding_is_unit_norm_and_logits_are_per_head():
    method = SelfClassifier(sc_args("--cls_size", 10, 20), INFO, CPU).eval()
    images = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        z = method.embedding(images)
        logits = method.head_logits(images)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(5))
    assert [tuple(x.shape) for x in logits] == [(5, 10), (5, 20)]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_views_meet_batch_norm_as_upstreams_model_sends_them(version):
    """v1 (635972b src/model.py L71-L74): each view through backbone and MLP on its own, batch statistics of that
    view alone; v2: the views of one size through together. Views of different statistics tell the two apart."""
    flags = ("--sc_version", "v1", "--row_tau", 0.3, "--col_tau", 0.3) if version == "v1" else ()
    method = SelfClassifier(sc_args(*flags), INFO, CPU).train()
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(6, 1, 8, 8, generator=g), 3 * torch.randn(6, 1, 8, 8, generator=g) + 1]
    with torch.no_grad():
        ours = method.embed(crops)
        alone = [torch.nn.functional.normalize(method.mlp(method.backbone(crop)), dim=1) for crop in crops]
        together = torch.nn.functional.normalize(method.mlp(method.backbone(torch.cat(crops))), dim=1, eps=1e-7)
    expected = alone if version == "v1" else list(together.split(6))
    other = list(together.split(6)) if version == "v1" else alone
    for z, reference, not_reference in zip(ours, expected, other):
        torch.testing.assert_close(z, reference, rtol=0, atol=1e-6)
        assert (z - not_reference).abs().max() > 1e-2


# ---- recipes ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,heads,version,views", [
    ("selfclassifier_cifar10_v1", [30] * 30, "v1", 2),
    ("selfclassifier_cifar100_20_v1", [60] * 30, "v1", 2),
    ("selfclassifier_cifar10_v2", [10, 20, 40, 80], "v2", 8),
    ("selfclassifier_cifar100_20_v2", [20, 40, 80, 160], "v2", 8),
    ("selfclassifier_imagenet", [1000, 2000, 4000, 8000], "v2", 8),
    ("selfclassifier_fashion_mnist", [10, 20, 40], "v2", 2),
])
def test_recipes_build_their_model(name, heads, version, views):
    args = MAIN.parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--device", "cpu"])
    channels = 1 if "fashion" in name else 3
    info = DataInfo(channels, 28 if channels == 1 else 32, 1000, 10, (0.5,) * channels, (0.25,) * channels)
    method = SelfClassifier(args, info, CPU)
    assert method.head_sizes == heads and args.sc_version == version and method.augment.num_crops == views
    trained = all(p.requires_grad for p in method.heads.parameters())
    assert trained == (version == "v2")
    if version == "v1":  # scripts/train_cifar10.sh of 635972b
        assert (args.row_tau, args.embed_dim, args.hidden_dim, args.num_hidden, args.lr, args.final_lr) == (
            0.3, 64, 256, 3, 3.2, 0.032)
        # --num-hidden 2 of src/model.py at 635972b: two hidden layers, PyTorch's default init (biases not zero)
        linears = [m for m in method.mlp.modules() if isinstance(m, nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == [(512, 256), (256, 256), (256, 64)]
        assert all(m.bias.abs().max() > 0 for m in linears)
        assert 0.8 < linears[1].weight.std() * math.sqrt(3 * 256) < 1.2  # uniform(+-1/sqrt(fan_in))
    if "imagenet" in name:  # scripts/train_800ep.sh of 3935138
        assert (args.queue_length, args.lr, args.start_warmup, args.final_lr, args.row_tau, args.col_tau) == (
            262144, 3.2, 0.2, 0.0032, 0.1, 0.05)


# ---- nearest-neighbour queue -----------------------------------------------------------------------------------------

def test_queue_fills_wraps_and_skips_the_query_itself():
    queue = NearestNeighbourQueue(5, 2, CPU)
    e0, e1, u = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([0.6, 0.8])
    queue.push(torch.stack([e0, e1, -e0]), torch.tensor([10, 11, 12]))
    assert not queue.full and queue.ptr == 3
    queue.push(torch.stack([-e1, 0.9 * e0, u]), torch.tensor([13, 14, 15]))
    assert queue.full and queue.ptr == 1
    assert queue.indices.tolist() == [15, 11, 12, 13, 14]  # slot 0 (e0) overwritten by u
    # e0's nearest is 0.9 e0, its own image (index 14), so the second nearest, u, is taken; e1 finds e1.
    found = queue.neighbours(torch.stack([e0, e1]), torch.tensor([14, 99]))
    torch.testing.assert_close(found, torch.stack([u, e1]))
    restored = NearestNeighbourQueue(5, 2, CPU)
    restored.load_state_dict(queue.state_dict())
    assert restored.ptr == 1 and restored.full and torch.equal(restored.embeddings, queue.embeddings)


def _queue_steps(rank, world):
    """Three steps of a 12-slot queue over a global batch of 8 embeddings (this rank's share): what each returned
    and the queue's contents."""
    generator = torch.Generator().manual_seed(0)
    queue, returned, given = NearestNeighbourQueue(12, 4, CPU), [], []
    for step in range(3):
        embeddings = torch.nn.functional.normalize(torch.randn(8, 4, generator=generator), dim=1)
        share = slice(rank * 8 // world, (rank + 1) * 8 // world)
        given.append(embeddings[share])
        returned.append(queue.step(embeddings[share], torch.arange(step * 8, step * 8 + 8)[share]))
    return {"returned": torch.cat(returned), "given": torch.cat(given), "embeddings": queue.embeddings,
            "indices": queue.indices}


def test_queue_on_two_processes_equals_one_process():
    # The global batch is pushed in rank order, and each rank's queries find the same neighbours as in one process.
    whole = _queue_steps(0, 1)
    ranks = run_distributed(_queue_steps, 2)
    for rank in ranks:
        assert torch.equal(rank["embeddings"], whole["embeddings"]) and torch.equal(rank["indices"], whole["indices"])
    for step in range(3):
        joined = torch.cat([rank["returned"][step * 4:(step + 1) * 4] for rank in ranks])
        assert torch.equal(joined, whole["returned"][step * 8:(step + 1) * 8])
    # the queue was full at the third step: neighbours came back instead of the embeddings given
    assert torch.equal(whole["returned"][:16], whole["given"][:16])
    assert not torch.equal(whole["returned"][16:], whole["given"][16:])


def test_queue_replaces_view_one_once_full():
    method = SelfClassifier(sc_args("--cls_size", 6, "--queue_len", 32), INFO, CPU)
    one_step(method)
    assert not method.queue.full and method.queue.ptr == 16
    one_step(method)
    assert method.queue.full
    before = method.queue.embeddings.clone()
    z = torch.nn.functional.normalize(torch.randn(16, 16), dim=1).requires_grad_()
    out = method.queue.step(z, torch.arange(100, 116))
    assert not out.requires_grad  # the neighbour comes from the queue: no gradient through view 1
    torch.testing.assert_close(out, before[(z.detach() @ before.t()).argmax(1)])  # looked up before the push
    assert torch.equal(method.queue.embeddings[:16], z.detach()) and method.queue.indices[:16].tolist() == list(
        range(100, 116))


def test_global_crops_split_into_groups_of_their_own_train_the_same():
    """`--nmb_crops 1 1 2` (each global crop its own group, for its own colour settings) is the same model and the
    same loss as `--nmb_crops 2 2`: two global crops either way."""
    common = ["--size_crops", 8, 8, 4, "--min_scale_crops", 0.4, 0.4, 0.1, "--max_scale_crops", 1, 1, 0.4]
    split = sc_args("--nmb_crops", 1, 1, 2, *common)
    joined = sc_args("--nmb_crops", 2, 2, "--size_crops", 8, 4, "--min_scale_crops", 0.4, 0.1,
                     "--max_scale_crops", 1, 0.4)
    losses = []
    for args in (split, joined):
        torch.manual_seed(0)
        method = SelfClassifier(args, INFO, CPU)
        assert method.num_global_crops == 2 and method.augment.num_crops == 4
        images = torch.randint(0, 256, (16, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        batch = Batch(images, torch.zeros(16, dtype=torch.long), torch.arange(16), 16, 0)
        losses.append(method(method.prepare(batch), batch, Progress(0, 0, 0, 1))[0])
    assert torch.equal(losses[0], losses[1])


# ---- end to end ----------------------------------------------------------------------------------------------------

def test_main_cluster_selfclassifier_run_reloads_its_heads(tmp_path):
    run_dir = tmp_path / "sc_digits"
    result = run_script("main_cluster.py", "--method", "selfclassifier", "--dataset", "digits", "--width", 4,
                        "--batch_size", 64, "--epochs", 2, "--cls_size", 10, 20, "--dim", 16, "--hidden_dim", 32,
                        "--nmb_crops", 2, 2, "--size_crops", 8, 4, "--min_scale_crops", 0.4, 0.1,
                        "--max_scale_crops", 1, 0.4, "--queue_len", 128, "--device", "cpu", "--output_dir", run_dir)
    assert_ok(result)
    state = checkpoint.load(run_dir / "checkpoint.pth", kind="cluster", method="selfclassifier")
    assert state["model"]["heads.1.weight_v"].shape == (20, 16)
    assert not torch.equal(state["model"]["heads.0.weight_g"], torch.ones(10, 1))  # g trained
    queue = state["method_state"]["queue"]
    assert queue["full"] and queue["indices"].min() >= 0
    assert len(state["method_state"]["last_head_losses"]) == 2
    loaded = load_run(run_dir, None, CPU)
    torch.testing.assert_close(loaded.method.heads[0].weight_g, state["model"]["heads.0.weight_g"])
    assert torch.equal(loaded.method.queue.indices, queue["indices"])
    with torch.no_grad():
        logits = loaded.method.head_logits(torch.randn(3, 1, 8, 8))
    assert [tuple(x.shape) for x in logits] == [(3, 10), (3, 20)]
