"""SeLa (methods/sela.py): the relabelling schedule against upstream's pop-list loop, resume, the labelling pass
against a naive per-image computation, 2 gloo processes against 1, the loss, AlexNet, and an end-to-end run.

Tolerances: labels must be equal exactly (the features differ by float32 rounding only, far below the gaps between
the Sinkhorn scores of random data); features 1e-5 absolute; losses 1e-6.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from clusterlab import checkpoint, data
from clusterlab.data.augment import eval_view
from clusterlab.errors import ConfigError
from clusterlab.eval.features import load_run
from clusterlab.methods import DataInfo
from clusterlab.methods.base import Batch, Progress
from clusterlab.methods import sela as sela_module
from clusterlab.methods.sela import SeLa, heads_to_relabel, initial_labels, relabel_times
from clusterlab.models import build_backbone
from clusterlab.models.batchnorm import convert_sync_batchnorm
from clusterlab.ops.sinkhorn import SelaSolution
from conftest import ROOT, assert_ok, entry_module, run_script
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture
from test_sinkhorn_dataset import naive_sela, p_power

MAIN = entry_module("main_cluster")
CPU = torch.device("cpu")


def sela_args(*extra):
    return MAIN.parse_args(["--method", "sela", "--dataset", "digits", "--arch", "resnet18_cifar", "--width", "4",
                            "--device", "cpu", *map(str, extra)])


# ---- schedule ------------------------------------------------------------------------------------------------------

def test_relabel_times_follow_the_formulas():
    linear = relabel_times("linear", epochs=4, num_samples=100, nopts=5)
    assert linear == pytest.approx([0.0, 125.0025, 250.005, 375.0075, 500.01], rel=1e-12)
    quadratic = relabel_times("quadratic", epochs=4, num_samples=100, nopts=5)
    assert quadratic == pytest.approx([0.0, 501 / 16, 501 / 4, 501 * 9 / 16, 501.0], rel=1e-12)
    assert heads_to_relabel("linear", 13, 10) == [3] and heads_to_relabel("quadratic", 13, 3) == [0, 1, 2]


def upstream_events(schedule, epochs, samples, batch, nopts, hc, steps_per_epoch):
    """The self-label loop (cifar.py / main.py): times reversed behind a sentinel; at every step, if
    niter * batch >= the last entry, pop it and relabel (at most once per step)."""
    fractions = np.linspace(0, 1, nopts)
    if schedule == "linear":
        times = [(epochs + 10) * samples] + list((epochs + 1.0001) * samples * fractions[::-1])
    else:
        times = [(epochs + 2) * samples] + list((epochs + 1.01) * samples * fractions[::-1] ** 2)
    events = []
    for epoch in range(epochs):
        for i in range(steps_per_epoch):
            if (epoch * steps_per_epoch + i) * batch >= times[-1]:
                times.pop()
                events.append((epoch, i, [epoch % hc] if schedule == "linear" else list(range(hc))))
    return events


def schedule_method(schedule, epochs, nopts, hc=3, samples=100, batch=16):
    args = sela_args("--sela_schedule", schedule, "--epochs", epochs, "--nopts", nopts, "--hc", hc, "--ncl", 4,
                     "--batch_size", batch)
    method = SeLa(args, DataInfo(1, 8, samples, 10, (0.5,), (0.25,)), CPU)
    method.events = []

    def record(heads):
        method.events.append((method.progress.epoch, method.progress.step, heads))
        solved = SelaSolution(torch.zeros(0, dtype=torch.long), torch.zeros(4), torch.zeros(0), 1, 0.0, True)
        return [solved] * len(heads)

    method.relabel = record
    return method


def drive(method, epochs, steps_per_epoch, start=(0, 0), stop=None):
    """Call before_step as the engine does, from `start` = (epoch, step) up to, not including, `stop`."""
    for epoch in range(start[0], epochs):
        for step in range(start[1] if epoch == start[0] else 0, steps_per_epoch):
            if (epoch, step) == stop:
                return
            method.progress = Progress(epoch, step, epoch * steps_per_epoch + step, steps_per_epoch)
            method.before_step(method.progress)


@pytest.mark.parametrize("schedule,epochs,nopts", [("linear", 7, 8), ("linear", 5, 12), ("quadratic", 6, 9)])
def test_relabelling_steps_match_upstream(schedule, epochs, nopts):
    steps = 100 // 16  # drop_last, as our loader
    method = schedule_method(schedule, epochs, nopts)
    drive(method, epochs, steps)
    expected = upstream_events(schedule, epochs, 100, 16, nopts, 3, steps)
    assert method.events == expected and len(expected) >= 5


@pytest.mark.parametrize("batch, note", [
    (20, None), (16, None),  # every image, or 96 of 100, in each epoch: the relabellings the schedule plans
    (40, "sela: 6 of --nopts 10 relabellings fall inside the run, where 7 would with every image in every epoch: "
         "full batches of 40 take 80 of the 100 images an epoch, and the relabelling schedule counts the samples seen"),
    (60, "sela: 4 of --nopts 10 relabellings fall inside the run, where 7"),
])
def test_relabellings_a_batch_size_leaves_out_of_the_run_are_told_at_start(batch, note):
    """The schedule's clock counts the samples of full batches (upstream's): a recipe moved to a batch size that
    leaves many images out of every epoch relabelled fewer times, without a word (8, 6 and 3 of 10 on digits at
    batch 64, 256 and 450)."""
    method = schedule_method("linear", 4, 10, batch=batch)
    drive(method, 4, 100 // batch)
    notes = method.whole_run_settings(100 // batch)
    assert notes == [] if note is None else (len(notes) == 1 and notes[0].startswith(note)), notes
    if note:
        assert notes[0].split()[1] == str(len(method.events))  # the count told is the count that happens


@pytest.mark.parametrize("schedule", ["linear", "quadratic"])
@pytest.mark.parametrize("stop", [(2, 3), (3, 0), (0, 1)])
def test_resume_neither_repeats_nor_skips_a_relabelling(schedule, stop):
    steps, epochs = 6, 6
    whole = schedule_method(schedule, epochs, 10)
    drive(whole, epochs, steps)
    first = schedule_method(schedule, epochs, 10)
    drive(first, epochs, steps, stop=stop)
    first.labels = torch.randint(0, 4, first.labels.shape)
    state = first.extra_state()
    second = schedule_method(schedule, epochs, 10)
    second.load_extra_state(state)
    assert torch.equal(second.labels, first.labels) and second.labels.dtype == torch.int64
    drive(second, epochs, steps, start=stop)
    assert first.events + second.events == whole.events


@pytest.mark.parametrize("epochs,nopts", [(6, 6), (3, 30), (6, 12)])
def test_a_run_resumed_under_another_schedule_relabels_at_the_new_times_still_ahead(epochs, nopts):
    """Upstream's resume (cifar.py L221-L222) keeps the new schedule's times still ahead: extending 2 epochs of 6
    relabellings to 6 epochs relabels at the new times (the saved index skipped all but the last); 30 over 3 epochs
    start from the new times too (the saved index, far behind, relabelled at every step until it caught up)."""
    steps = 100 // 16
    first = schedule_method("linear", 2, 6)
    drive(first, 2, steps)
    state = first.extra_state()
    second = schedule_method("linear", epochs, nopts)
    second.load_extra_state(state)
    drive(second, epochs, steps, start=(2, 0))
    # upstream's rule on the times kept (samples counted as here: steps x batch), at most one per step: those the
    # last step run (2 * steps - 1) had not reached; with 12 over 6 epochs one falls between it and the resumed step
    ahead = [t for t in relabel_times("linear", epochs, 100, nopts) if t > (2 * steps - 1) * 16]
    expected = []
    for epoch in range(2, epochs):
        for i in range(steps):
            if ahead and (epoch * steps + i) * 16 >= ahead[0]:
                ahead.pop(0)
                expected.append((epoch, i, [epoch % 3]))
    assert second.events == expected and len(expected) >= 2


def test_a_checkpoint_with_other_label_shapes_is_refused():
    method = schedule_method("linear", 4, 5, hc=3)
    state = schedule_method("linear", 4, 5, hc=2).extra_state()
    with pytest.raises(ValueError, match="labels"):
        method.load_extra_state(state)


def test_initial_labels_are_balanced_random_and_seeded():
    labels = initial_labels(3, 103, 10, seed=7)
    assert labels.shape == (3, 103) and labels.dtype == torch.int64
    for row in labels:
        assert row.bincount(minlength=10).tolist() == [11, 11, 11] + [10] * 7
    assert not torch.equal(labels[0], labels[1])
    assert torch.equal(labels, initial_labels(3, 103, 10, seed=7))
    assert not torch.equal(labels, initial_labels(3, 103, 10, seed=8))


@pytest.mark.parametrize("flags,flag", [(("--nopts", 1), "--nopts"), (("--nmb_crops", 2), "--nmb_crops")])
def test_bad_values_name_the_flag(flags, flag):
    with pytest.raises(ConfigError, match=flag):
        SeLa(sela_args(*flags), DataInfo(1, 8, 50, 10, (0.5,), (0.25,)), CPU)


# ---- the labelling pass ----------------------------------------------------------------------------------------------

def labelled_method(view="eval", chunk=64, samples=193, seed=0):
    """A fresh width-4 model on the first `samples` digits at 16 px, heads scaled up so the labels are not ties."""
    torch.manual_seed(seed)
    images = data.load("digits", "train").subset(range(samples))
    args = sela_args("--label_view", view, "--label_batch_size", chunk, "--hc", 2, "--ncl", 10, "--size_crops", 16,
                     "--seed", seed)
    method = SeLa(args, DataInfo.of(images), CPU)
    for head in method.heads:
        nn.init.normal_(head.weight, 0.0, 1.0)
    method.attach_data(images)
    return method, images


def test_eval_view_labels_equal_a_naive_per_image_computation():
    method, images = labelled_method("eval")
    before = method.labels.clone()
    method.train()
    method.relabel([1])
    assert method.training
    method.eval()
    with torch.no_grad():
        features = torch.cat([method.backbone(eval_view(images.images[i:i + 1], 16, images.mean, images.std))
                              for i in range(len(images))])
        logits = method.heads[1](features)
    labels = naive_sela(p_power(logits, method.args.lamb), method.args.sk_tol)[2]
    assert method.labels[1].tolist() == labels.tolist()
    assert torch.equal(method.labels[0], before[0])


def test_labelling_logits_are_upstreams_float64_product(monkeypatch):
    """Upstream's CIFAR code (cifar.py, opt_sk) copies the features into a float64 numpy array and computes
    PS_pre @ weight.T + bias with the head's float32 weights, so numpy multiplies in float64. `--label_dtype float64`
    (the default and the recipes') hands the Sinkhorn exactly those logits (1e-12: summation order only), here in
    chunks of one row; `float32` (upstream's multi-GPU path) misses them by float32 round-off (> 1e-9)."""
    method, _ = labelled_method("eval")
    seen, solve = [], sela_module.sela_sinkhorn
    monkeypatch.setattr(sela_module, "sela_sinkhorn",  # (a copy: the Sinkhorn then works in the logits' storage)
                        lambda logits, *rest, **options: seen.append(logits.clone()) or solve(logits, *rest, **options))
    monkeypatch.setattr(sela_module, "rows_per_chunk", lambda row_length: 1)
    method.relabel([1])
    features = np.zeros(tuple(method.label_features()[0].shape))
    features[:] = method.label_features()[0].numpy()
    head = method.heads[1]
    upstream = features @ head.weight.detach().numpy().T + head.bias.detach().numpy()
    assert seen[0].dtype == torch.float64 and np.abs(seen[0].numpy() - upstream).max() < 1e-12
    method.args.label_dtype = "float32"
    method.relabel([1])
    assert seen[1].dtype == torch.float32 and np.abs(seen[1].double().numpy() - upstream).max() > 1e-9


def test_eval_view_does_not_depend_on_the_chunk_size():
    small, _ = labelled_method("eval", chunk=7)
    large, _ = labelled_method("eval", chunk=500)
    a, pa = small.label_features()
    b, pb = large.label_features()
    assert torch.equal(pa.sort().values, torch.arange(193)) and torch.equal(pb, pa)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_labelling_chunks_are_shuffled_and_each_crop_is_its_images_own(monkeypatch):
    """Upstream labels from its shuffled training loader: the chunks (here 16 images) of a class-sorted set mix the
    classes, in an order of their own per labelling; in the train view each image gets the crop parameters drawn
    for its dataset position, wherever the shuffle puts it."""
    method, images = labelled_method("train", chunk=16)
    order = images.labels.argsort(stable=True)  # sorted by class, as an image folder lists its files
    method.attach_data(images.subset(order.tolist()))
    drawn = method.label_augment.sample(len(images))[0]
    method.label_augment.generator.manual_seed(method.args.seed + sela_module.LABEL_VIEW_SEED)
    applied, apply = [], method.label_augment.apply
    monkeypatch.setattr(method.label_augment, "apply", lambda batch, params, size: applied.append(params)
                        or apply(batch, params, size))
    _, positions = method.label_features()
    first_chunk = method.train_set.labels[positions[:16]]
    assert torch.equal(positions.sort().values, torch.arange(193)) and first_chunk.unique().numel() > 3
    taken = applied[0]
    assert torch.equal(taken.boxes, drawn.boxes[positions[:16]]) and torch.equal(taken.flip, drawn.flip[positions[:16]])
    method.next_relabel += 1
    assert not torch.equal(method.label_features()[1], positions)


def test_train_view_restores_bn_statistics_and_mode():
    method, _ = labelled_method("train")
    method.eval()
    buffers = {k: v.clone() for k, v in method.named_buffers()}
    method.relabel([0, 1])
    assert not method.training
    for name, value in method.named_buffers():
        assert torch.equal(value, buffers[name]), name
    # The pass did run in train mode: eval-mode features of the same images differ.
    train_features, _ = method.label_features()
    method.args.label_view = "eval"
    eval_features, _ = method.label_features()
    assert (train_features - eval_features).abs().max() > 1e-3


def _labelling_worker(rank, world, view, chunk=64):
    method, _ = labelled_method(view, chunk=chunk)
    convert_sync_batchnorm(method, CPU)
    method.relabel([0, 1])
    features, positions = method.label_features()
    return {"labels": method.labels, "features": features, "positions": positions}


@pytest.fixture(scope="module", params=["train", "eval"])
def labelling_runs(request):
    return request.param, run_distributed(_labelling_worker, 2, request.param)


def test_two_processes_label_like_one(labelling_runs):
    """193 images in chunks of 64: the last chunk holds one image, so rank 1 runs an empty pass (synchronised BN)."""
    view, results = labelling_runs
    method, _ = labelled_method(view)
    method.relabel([0, 1])
    features, positions = method.label_features()
    for result in results:
        assert torch.equal(result["labels"], method.labels)
    assert [len(r["positions"]) for r in results] == [97, 96]
    assert torch.equal(torch.cat([r["positions"] for r in results]).sort().values, torch.arange(193))
    by_position = torch.empty_like(features)
    by_position[positions] = features
    order = torch.cat([r["positions"] for r in results])
    torch.testing.assert_close(torch.cat([r["features"] for r in results]), by_position[order], rtol=0, atol=1e-5)


def test_three_processes_label_like_one_with_chunks_that_do_not_split_evenly():
    """Chunks of 16 over 3 ranks (6 + 5 + 5 images): each pass's batch statistics are still those of one process's 16
    (they grew to 18, the next multiple of 3, and the labels moved); the last chunk of 1 image leaves two ranks an
    empty pass."""
    method, _ = labelled_method("train", chunk=16)
    method.relabel([0, 1])
    features, positions = method.label_features()
    results = run_distributed(_labelling_worker, 3, "train", 16)
    for result in results:
        assert torch.equal(result["labels"], method.labels)
    assert [len(r["positions"]) for r in results] == [73, 60, 60]  # 12 chunks of 6 + 5 + 5, then 1 + 0 + 0
    by_position = torch.empty_like(features)
    by_position[positions] = features
    order = torch.cat([r["positions"] for r in results])
    torch.testing.assert_close(torch.cat([r["features"] for r in results]), by_position[order], rtol=0, atol=1e-5)


def _refused_label_batch(rank, world):
    method, _ = labelled_method("train", chunk=1)  # built, as an evaluation builds it: refused for training only
    try:
        method.check_training_settings()
    except ConfigError as err:
        return str(err)


def test_more_clusters_than_images_is_refused_for_training():
    method, _ = labelled_method("train", samples=193)
    method.args.head_classes = 194
    with pytest.raises(ConfigError, match=r"^--head_classes 194 \(--ncl\) asks for more clusters than the 193 "):
        method.check_training_settings()
    method.args.head_classes = 193
    method.check_training_settings()


def test_a_lambda_whose_power_underflows_is_refused_naming_it():
    """--lamb 10000: P^lambda underflowed for whole images, the scalings went infinite, the stopping rule (a nansum)
    read 0, and every image got one label, reported as solved with error 0."""
    method, _ = labelled_method("eval")
    method.args.lamb = 10_000.0
    with pytest.raises(ConfigError, match=r"^--lamb 10000: SeLa's Sinkhorn found no labels for head 0 .*use a "
                                          r"smaller --lamb"):
        method.relabel([0])
    method.args.lamb = 10.0
    assert len(method.relabel([0])[0].labels.unique()) > 1


def test_fewer_labelling_images_than_processes_is_refused():
    assert run_distributed(_refused_label_batch, 2) == [
        "--label_batch_size 1 is below the 2 processes: give every process at least one image per labelling pass"] * 2


def test_loss_is_the_mean_cross_entropy_of_the_heads():
    method, images = labelled_method("eval", samples=64)
    method.labels = torch.randint(0, 10, method.labels.shape)
    indices = torch.tensor([5, 0, 63, 17])
    batch = Batch(images.images[indices], images.labels[indices], indices, 4, 0)
    crops = method.prepare(batch)
    loss, terms = method(crops, batch, Progress(0, 0, 0, 1))
    logits = method.head_logits(crops[0])
    expected = sum(F.cross_entropy(logits[h], method.labels[h, indices]) for h in range(2)) / 2
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert float(terms["ce"]) == pytest.approx(float(loss.detach()))


# ---- recipes ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,arch,eval_size", [("sela_cifar10_alexnet", "alexnet_bn", 224),
                                                 ("sela_cifar100_alexnet", "alexnet_bn", 224),
                                                 ("sela_cifar10_resnet", "resnet18_cifar", 32),
                                                 ("sela_cifar100_resnet", "resnet18_cifar", 32),
                                                 ("sela_fashion_mnist", "resnet18_cifar", 28)])
def test_recipes_build_their_model(name, arch, eval_size):
    args = MAIN.parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--device", "cpu"])
    channels = 1 if "fashion" in name else 3
    method = SeLa(args, DataInfo(channels, 28 if channels == 1 else 32, 1000, 10, (0.5,) * channels,
                                 (0.25,) * channels), CPU)
    assert args.arch == arch and method.eval_size == eval_size and method.augment.num_crops == 1
    if "cifar" in name:  # upstream's scripts/cifar.sh
        assert (args.num_heads, args.head_classes, args.nopts, args.lamb) == (10, 128, 400, 10.0)
        assert (args.epochs, args.batch_size) == (400, 128)
        assert (args.lr, args.momentum, args.weight_decay, args.lr_drops) == (0.03, 0.9, 5e-4, [240, 320])
        assert (args.sela_schedule, args.sk_tol, args.label_view) == ("linear", 0.01, "train")
        assert method.head_sizes == [128] * 10
        assert method.heads[0].in_features == (4096 if arch == "alexnet_bn" else 512)


# ---- AlexNet -------------------------------------------------------------------------------------------------------

def test_alexnet_layout_at_the_standard_width():
    model = build_backbone("alexnet_bn", 3, 64)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [
        (96, 11, 4, 2), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 3
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 5
    assert [type(m) for m in model.classifier] == [nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU]
    assert model.classifier[1].in_features == 256 * 6 * 6 and model.out_dim == 4096
    with torch.no_grad():
        assert model.features(torch.randn(1, 3, 224, 224)).shape == (1, 256, 6, 6)  # the 6x6 pool is the identity


def test_tiny_alexnet_on_grey_images():
    model = build_backbone("alexnet_bn", 1, 4).eval()
    assert model.out_dim == 256
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 256) and torch.isfinite(out).all() and (out >= 0).all()


# ---- end to end ----------------------------------------------------------------------------------------------------

def test_main_cluster_sela_run_writes_labels_that_reload(tmp_path):
    run_dir = tmp_path / "sela_digits"
    result = run_script("main_cluster.py", "--method", "sela", "--dataset", "digits", "--width", 4, "--batch_size", 64,
                        "--epochs", 2, "--hc", 2, "--ncl", 10, "--nopts", 4, "--device", "cpu", "--output_dir", run_dir)
    assert_ok(result)
    assert result.stdout.count("sela: labels of head(s)") == 2
    state = checkpoint.load(run_dir / "checkpoint.pth", kind="cluster", method="sela")
    labels = state["method_state"]["labels"]
    assert labels.shape == (2, 898) and labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    assert state["method_state"]["next_relabel"] == 2  # t_0 = 0 and t_1 = 898.03 samples; t_2 is past 2 epochs
    start = initial_labels(2, 898, 10, seed=0 + 1)
    assert not torch.equal(labels[0], start[0]) and not torch.equal(labels[1], start[1])  # heads 0 and 1 relabelled
    loaded = load_run(run_dir, None, CPU)
    assert torch.equal(loaded.method.labels, labels) and loaded.method.next_relabel == 2
    torch.testing.assert_close(loaded.method.heads[1].weight, state["model"]["heads.1.weight"])
    with torch.no_grad():
        logits = loaded.method.head_logits(torch.randn(3, 1, 8, 8))
    assert [tuple(x.shape) for x in logits] == [(3, 10), (3, 10)] and loaded.method.head_sizes == [10, 10]


def test_a_lone_image_of_the_train_view_gets_features_of_its_own():
    """193 images in chunks of 64 leave one image alone in the last chunk. At 8 px the ResNet's last batch norm sees
    one value per channel: in train mode (the image twice) it normalised to the layer's bias, the same features
    whatever the image, so the lone image's label ignored it. It goes through with the running statistics."""
    torch.manual_seed(0)
    images = data.load("digits", "train").subset(range(193))
    method = SeLa(sela_args("--label_view", "train", "--label_batch_size", 64, "--hc", 2, "--ncl", 10,
                            "--size_crops", 8), DataInfo.of(images), CPU)
    method.attach_data(images)
    lone = []
    for _ in range(2):  # two labellings, in two orders: two other images alone
        features, positions = method.label_features()
        lone.append((positions[-1].item(), features[-1]))
        method.next_relabel += 1
    (first, first_features), (second, second_features) = lone
    assert first != second and (first_features - second_features).abs().max() > 1e-2


def test_a_labelling_chunk_of_one_image_trains_on(tmp_path):
    """898 digits in chunks of 299 leave one image: at 8 pixels train mode cannot normalise it (the run crashed
    mid-training before the lone image had a pass of its own)."""
    done = run_script("main_cluster.py", "--method", "sela", "--dataset", "digits", "--width", 4, "--size_crops", 8,
                      "--batch_size", 64, "--label_batch_size", 299, "--nopts", 2, "--epochs", 1, "--device", "cpu",
                      "--output_dir", tmp_path / "run")
    assert_ok(done)
