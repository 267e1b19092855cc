"""SCAN (methods/scan.py, methods/scan_selflabel.py, losses/scan.py, data/randaugment.py): the losses by hand and
against naive loops, the mined neighbours against a brute-force search, the strong augmentation against PIL, the
views and neighbour draws of a rank's slice equal to the global batch's, the EMA arithmetic and its exact resume,
and the three stages end to end (embedding -> scan -> self-labelling) scored by eval_cluster.py. The losses
against upstream's own code are in tests/test_golden.py (families scan_loss, scan_selflabel_ce)."""
from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import torch
import torch.nn.functional as F

from clusterlab import distributed, engine
from clusterlab.data import randaugment
from clusterlab.errors import ConfigError
from clusterlab.losses.scan import class_balance_weights, confident_cross_entropy, confident_targets, scan_loss
from clusterlab.methods import METHODS, Batch, DataInfo, Progress
from clusterlab.ops.knn import dataset_neighbours
from clusterlab.programs.train import parse_args
import fabricate
from conftest import TINY as TINY_SWAV
from conftest import HostCopies, assert_ok, assert_user_error, copy_run, entry_module, run_script
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture
from test_amp import images
from test_resume import assert_same_tensors

TINY = ["--dataset", "digits", "--width", "4", "--device", "cpu", "--log_every", "100", "--sync_bn", "false"]


# ---- the SCAN loss ---------------------------------------------------------------------------------------------------

def test_scan_loss_by_hand_two_samples_three_classes():
    """Logits log p give softmax p exactly. Anchors p(a) = (.5, .25, .25), (.2, .6, .2); neighbours
    (.5, .3, .2), (.1, .8, .1). Dot products .25 + .075 + .05 = .375 and .02 + .48 + .02 = .52, so consistency =
    -(ln .375 + ln .52) / 2; the mean anchor prediction is (.35, .425, .225), entropy = -sum q ln q."""
    anchors = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2]]).log()
    neighbours = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1]]).log()
    total, consistency, entropy = scan_loss(anchors, neighbours, entropy_weight=5.0)
    expected_consistency = -(math.log(0.375) + math.log(0.52)) / 2
    expected_entropy = -(0.35 * math.log(0.35) + 0.425 * math.log(0.425) + 0.225 * math.log(0.225))
    assert consistency.item() == pytest.approx(expected_consistency, abs=1e-6)
    assert entropy.item() == pytest.approx(expected_entropy, abs=1e-6)
    assert total.item() == pytest.approx(expected_consistency - 5.0 * expected_entropy, abs=1e-5)


def naive_scan_loss(anchors, neighbours, weight):
    """Loops over samples and classes, float64."""
    b, c = len(anchors), len(anchors[0])
    pa = [[math.exp(anchors[i][k]) / sum(math.exp(anchors[i][j]) for j in range(c)) for k in range(c)]
          for i in range(b)]
    pn = [[math.exp(neighbours[i][k]) / sum(math.exp(neighbours[i][j]) for j in range(c)) for k in range(c)]
          for i in range(b)]
    consistency = -sum(max(math.log(sum(pa[i][k] * pn[i][k] for k in range(c))), -100) for i in range(b)) / b
    mean = [max(sum(pa[i][k] for i in range(b)) / b, 1e-8) for k in range(c)]
    entropy = -sum(q * math.log(q) for q in mean)
    return consistency - weight * entropy, consistency, entropy


def test_neighbour_label_agreement_counts_labelled_pairs_only():
    """STL-10's train+unlabeled: two unlabelled images (-1) are not a pair that agrees."""
    from clusterlab.ops.knn import neighbour_label_agreement

    labels = torch.tensor([0, 0, 1, -1, -1])
    neighbours = torch.tensor([[1, 2], [0, 3], [0, 4], [4, 0], [3, 1]])
    # labelled pairs: (0,1) agree, (0,2) no, (1,0) agree, (2,0) no: 2 of 4; the unlabelled ones left out
    assert neighbour_label_agreement(labels, labels[neighbours]) == 0.5
    unlabelled = torch.full((2,), -1)
    assert math.isnan(neighbour_label_agreement(unlabelled, unlabelled[torch.tensor([[1], [0]])]))


def test_scan_loss_equals_a_naive_loop():
    g = torch.Generator().manual_seed(3)
    anchors, neighbours = torch.randn(12, 7, generator=g) * 2, torch.randn(12, 7, generator=g) * 2
    ours = scan_loss(anchors, neighbours, 2.5)
    reference = naive_scan_loss(anchors.double().tolist(), neighbours.double().tolist(), 2.5)
    for value, expected in zip(ours, reference):
        assert value.item() == pytest.approx(expected, abs=2e-6)


def test_scan_loss_prefers_agreeing_neighbours_and_spread_classes():
    """A neighbour predicting the anchor's class costs less than one predicting another; with the weight on,
    all anchors in one class costs more than anchors spread over the classes."""
    one_hot = torch.eye(4) * 6
    agree, _, _ = scan_loss(one_hot, one_hot, 0.0)
    disagree, _, _ = scan_loss(one_hot, one_hot.roll(1, dims=0), 0.0)
    assert agree < disagree
    collapsed = torch.zeros(4, 4)
    collapsed[:, 0] = 6
    assert scan_loss(collapsed, collapsed, 5.0)[0] > scan_loss(one_hot, one_hot, 5.0)[0]


# ---- self-labelling: confident targets, class balance, the cross-entropy ---------------------------------------------

def naive_confident_ce(weak, strong, threshold, balance):
    """Loops: targets and mask by hand, weights n / n_c over the confident rows, weighted mean of -log softmax."""
    b, c = len(weak), len(weak[0])
    targets, mask = [], []
    for row in weak:
        probs = [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
        targets.append(max(range(c), key=probs.__getitem__))
        mask.append(max(probs) > threshold)
    confident = [targets[i] for i in range(b) if mask[i]]
    weights = [1.0] * c
    if balance:
        for k in set(confident):
            weights[k] = len(confident) / confident.count(k)
    numerator = denominator = 0.0
    for i in range(b):
        if mask[i]:
            log_prob = strong[i][targets[i]] - math.log(sum(math.exp(u) for u in strong[i]))
            numerator += -weights[targets[i]] * log_prob
            denominator += weights[targets[i]]
    return numerator / denominator, targets, mask, weights


@pytest.mark.parametrize("balance", [True, False])
def test_confident_cross_entropy_mask_and_weights_equal_a_naive_loop(balance):
    g = torch.Generator().manual_seed(1)
    weak = torch.randn(40, 5, generator=g) * 5
    weak[:12, 1] += 10  # a large confident class
    strong = torch.randn(40, 5, generator=g)
    expected, targets, mask, weights = naive_confident_ce(weak.double().tolist(), strong.double().tolist(), 0.9,
                                                          balance)
    ours_targets, ours_mask = confident_targets(weak, 0.9)
    assert ours_targets.tolist() == targets and ours_mask.tolist() == mask
    assert 10 < sum(mask) < 40  # some rows confident, some not: the mask matters
    if balance:
        assert class_balance_weights(ours_targets, ours_mask, 5).tolist() == pytest.approx(weights, rel=1e-6)
        assert len(set(weights)) > 1
    loss, confident = confident_cross_entropy(weak, strong, 0.9, balance)
    assert loss.item() == pytest.approx(expected, rel=1e-5) and confident.item() == sum(mask)


def test_class_balance_weights_by_hand():
    """Confident targets 0, 0, 0, 2 (n = 4): w_0 = 4 / 3, w_2 = 4 / 1, the absent class 1 keeps 1; the
    unconfident row (target 1) counts for nothing."""
    targets = torch.tensor([0, 0, 2, 1, 0])
    mask = torch.tensor([True, True, True, False, True])
    assert class_balance_weights(targets, mask, 3).tolist() == pytest.approx([4 / 3, 1.0, 4.0])


def test_no_confident_sample_gives_a_zero_loss_with_a_gradient_path():
    strong = torch.randn(6, 4, requires_grad=True)
    loss, confident = confident_cross_entropy(torch.zeros(6, 4), strong, 0.99, True)
    loss.backward()
    assert loss.item() == 0.0 and confident.item() == 0 and torch.equal(strong.grad, torch.zeros(6, 4))


def _losses_on_ranks(rank, world_size, anchors, neighbours, weak, strong):
    share = anchors.shape[0] // world_size
    rows = slice(rank * share, (rank + 1) * share)
    a, n, s = (x[rows].clone().requires_grad_() for x in (anchors, neighbours, strong))
    total, _, entropy = scan_loss(a, n, 5.0)
    total.backward()
    ce, confident = confident_cross_entropy(weak[rows], s, 0.9, True)
    ce.backward()
    return total.detach(), entropy.detach(), a.grad, n.grad, ce.detach(), confident, s.grad


def test_losses_on_two_processes_equal_one_process():
    """The mean of the ranks' losses is the one-process loss (the entropy of the global mean prediction, the class
    weights and the denominator of the global batch), and a rank's rows get 2 x the one-process gradient, which
    DDP's average over the 2 ranks divides back out."""
    g = torch.Generator().manual_seed(2)
    anchors, neighbours, strong = (torch.randn(16, 6, generator=g) * 2 for _ in range(3))
    weak = torch.randn(16, 6, generator=g) * 5
    weak[:6, 2] += 10
    results = run_distributed(_losses_on_ranks, 2, anchors, neighbours, weak, strong)
    whole = [x.clone().requires_grad_() for x in (anchors, neighbours, strong)]
    total, _, entropy = scan_loss(whole[0], whole[1], 5.0)
    total.backward()
    ce, confident = confident_cross_entropy(weak, whole[2], 0.9, True)
    ce.backward()
    assert torch.allclose(sum(r[0] for r in results) / 2, total.detach(), atol=1e-5)
    assert torch.allclose(sum(r[4] for r in results) / 2, ce.detach(), atol=1e-5)
    for rank, (_, rank_entropy, grad_a, grad_n, _, rank_confident, grad_s) in enumerate(results):
        rows = slice(rank * 8, (rank + 1) * 8)
        assert torch.allclose(rank_entropy, entropy.detach(), atol=1e-6) and rank_confident == confident
        assert torch.allclose(grad_a, 2 * whole[0].grad[rows], atol=1e-6)
        assert torch.allclose(grad_n, 2 * whole[1].grad[rows], atol=1e-6)
        assert torch.allclose(grad_s, 2 * whole[2].grad[rows], atol=1e-6)


# ---- the strong augmentation (data/randaugment.py) against PIL -------------------------------------------------------

def _pil_and_tensor(narrow: bool = False):
    """A random RGB image; `narrow`: values 10..200 in one channel, 40..90 in another, 0..255 in the third, so that
    autocontrast stretches them (on the full range it changes nothing)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 20, 24), dtype=np.uint8)
    if narrow:
        pixels[0], pixels[1] = rng.integers(10, 201, (20, 24)), rng.integers(40, 91, (20, 24))
    return PIL.Image.fromarray(pixels.transpose(1, 2, 0)), torch.from_numpy(pixels)[None].float() / 255


def _from_pil(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy())[None].float() / 255


PIL_EXACT = [
    ("translate_x", 0.1, lambda im, v: im.transform(im.size, PIL.Image.AFFINE, (1, 0, v * 24, 0, 1, 0))),
    ("translate_y", -0.05, lambda im, v: im.transform(im.size, PIL.Image.AFFINE, (1, 0, 0, 0, 1, v * 20))),
    ("shear_x", 0.0833, lambda im, v: im.transform(im.size, PIL.Image.AFFINE, (1, v, 0, 0, 1, 0))),
    ("shear_y", -0.1, lambda im, v: im.transform(im.size, PIL.Image.AFFINE, (1, 0, 0, v, 1, 0))),
    ("rotate", 17.3, lambda im, v: im.rotate(v)),
    ("rotate", -29.0, lambda im, v: im.rotate(v)),
    ("autocontrast", 0.0, lambda im, v: PIL.ImageOps.autocontrast(im)),
    ("autocontrast", -1.0, lambda im, v: PIL.ImageOps.autocontrast(im)),  # -1: pixels of a narrow range
    ("equalize", 0.0, lambda im, v: PIL.ImageOps.equalize(im)),
    ("solarize", 100.5, lambda im, v: PIL.ImageOps.solarize(im, v)),
    ("posterize", 4.7, lambda im, v: PIL.ImageOps.posterize(im, int(v))),
]


@pytest.mark.parametrize("name, v, pil_op", PIL_EXACT, ids=[f"{n}_{v}" for n, v, _ in PIL_EXACT])
def test_geometric_and_lookup_operations_equal_pil(name, v, pil_op):
    image, x = _pil_and_tensor(narrow=v == -1.0)
    ours = randaugment.apply_operation(name, x, torch.tensor([v]))
    assert torch.equal((ours * 255).round(), (_from_pil(pil_op(image, v)) * 255).round())


def test_equalize_of_a_whole_batch_equals_pil_per_image_and_channel():
    """Random, few-valued, constant and two-valued channels (a step of 0 leaves a channel as it is), 1 and 3
    channels; and it runs on the meta device, which holds no data: nothing is read back."""
    generator = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        batch = torch.randint(256, (6, channels, 9, 11), generator=generator, dtype=torch.uint8)
        batch[1] = torch.randint(3, (channels, 9, 11), generator=generator, dtype=torch.uint8) * 40
        batch[2] = 77
        batch[3] = 0
        batch[3, :, 0, 0] = 255
        ours = randaugment.equalize(batch)
        for image, equalized in zip(batch, ours):
            for channel, expected in zip(image, equalized):
                pil = PIL.ImageOps.equalize(PIL.Image.fromarray(channel.numpy()))
                assert torch.equal(torch.from_numpy(np.array(pil)), expected)
    assert randaugment.equalize(torch.empty(4, 3, 8, 8, dtype=torch.uint8, device="meta")).shape == (4, 3, 8, 8)


@pytest.mark.parametrize("name, enhance", [("color", PIL.ImageEnhance.Color), ("contrast", PIL.ImageEnhance.Contrast),
                                           ("brightness", PIL.ImageEnhance.Brightness),
                                           ("sharpness", PIL.ImageEnhance.Sharpness)])
def test_blends_equal_pil_up_to_its_rounding_to_8_bits(name, enhance):
    """PIL rounds each result to 8 bits (and its grey and mean to integers); the batched blends keep floats."""
    image, x = _pil_and_tensor()
    for v in (0.3, 0.9):
        ours = randaugment.apply_operation(name, x, torch.tensor([v]))
        assert float((ours - _from_pil(enhance(image).enhance(v))).abs().max()) <= 1.5 / 255


def test_cutout_equals_a_naive_box():
    """A box of side 2 (l // 2) centred on (y, x), clipped at the border, zeroed after normalisation."""
    params = randaugment.StrongParams(torch.zeros(3, dtype=torch.bool), torch.zeros(3, 0, dtype=torch.long),
                                      torch.zeros(3, 0, dtype=torch.float64), torch.tensor([5, 16, 1]),
                                      torch.tensor([0, 10, 4]), torch.tensor([7, 3, 4]))
    ones = torch.ones(3, 2, 12, 12)
    out = randaugment.cutout(ones, params)
    expected = torch.ones(3, 2, 12, 12)
    for i, (length, y, x) in enumerate(zip([5, 16, 1], [0, 10, 4], [7, 3, 4])):
        for r in range(12):
            for c in range(12):
                if max(0, y - length // 2) <= r < min(12, y + length // 2) and \
                        max(0, x - length // 2) <= c < min(12, x + length // 2):
                    expected[i, :, r, c] = 0
    assert torch.equal(out, expected)
    assert expected[2].eq(1).all()  # l = 1: 1 // 2 = 0, no hole (as upstream)


def test_operations_are_drawn_from_the_whole_list_with_upstream_ranges():
    params = randaugment.sample_strong(4000, 8, 8, 4, 16, torch.Generator().manual_seed(0))
    assert params.ops.unique().tolist() == list(range(14))
    for index, (name, low, high) in enumerate(randaugment.OPERATIONS):
        v = params.magnitudes[params.ops == index]
        if name in randaugment.GEOMETRIC:
            assert v.abs().max() <= max(abs(low), abs(high))
            assert (v < 0).any() and (v > 0).any()
        else:
            assert low <= v.min() and v.max() < high
    assert params.cut_length.min() == 1 and params.cut_length.max() == 16


# ---- the methods -----------------------------------------------------------------------------------------------------

def build(method: str, train=None, *flags):
    args = parse_args("cluster", ["--method", method, *TINY, "--output_dir", "unused", *flags])
    train = train or images(64)
    torch.manual_seed(0)
    model = METHODS[method](args, DataInfo.of(train), torch.device("cpu"))
    model.attach_data(train)
    return model, train


def test_mined_neighbours_equal_a_brute_force_search():
    """Each image first, then its K others in decreasing cosine of the eval-mode backbone features of the test view
    (equal cosines by index)."""
    method, train = build("scan", None, "--num_neighbours", "6")
    method.train()
    found = method.mine_neighbours()
    assert method.training  # back in train mode afterwards
    method.eval()
    with torch.no_grad():
        views = (train.images.float() / 255 - 0.5) / 0.25
        features = F.normalize(method.backbone(views), dim=1).double()
    for i in range(len(train)):
        order = sorted((j for j in range(len(train)) if j != i), key=lambda j: (-float(features[i] @ features[j]), j))
        assert found[i].tolist() == [i] + order[:6], i


def test_neighbours_are_mined_on_the_pretrained_runs_test_view():
    """The pre-trained run trained 16 px crops of the 8 px images and scored its embedding on 16 px test views:
    its neighbours are those of 16 px views (mined at this run's own 8 px they agreed with the labels far less).
    Its view is kept by the checkpoint (a resume records the same) and config.yaml's entries name it; --mining_crop
    asks for another."""
    method, train = build("scan", None, "--num_neighbours", "6")
    stage_one = {name: value for name, value in method.state_dict().items() if name.startswith("backbone.")}
    method.load_pretrained("RUN", "RUN/checkpoint.pth", {"model": stage_one, "method": "swav", "args": {
        "arch": "resnet18_cifar", "width": 4, "size_crops": [16, 6], "eval_crop": 0, "eval_resize": 0}})
    assert method.recorded()["neighbours_mined_on"] == {"crop": 16, "resize": 16}
    found = method.mine_neighbours()
    method.eval()
    with torch.no_grad():
        views = F.interpolate(train.images.float() / 255, size=(16, 16), mode="bilinear", antialias=True)
        features = F.normalize(method.backbone((views - 0.5) / 0.25), dim=1)
    assert torch.equal(found, dataset_neighbours(features, 7, include_self=True).indices)
    resumed, _ = build("scan", None, "--num_neighbours", "6", "--mining_crop", "10")  # another crop asked: too late
    resumed.load_extra_state(method.extra_state())
    assert resumed.recorded()["neighbours_mined_on"] == {"crop": 16, "resize": 16}
    assert build("scan")[0].recorded()["neighbours_mined_on"] == {"crop": 8, "resize": 8}  # no --pretrained
    asked, _ = build("scan", None, "--num_neighbours", "6", "--mining_crop", "12")
    asked.load_pretrained("RUN", "RUN/checkpoint.pth", {"model": stage_one, "method": "swav", "args": {
        "arch": "resnet18_cifar", "width": 4, "size_crops": [16, 6], "eval_crop": 0, "eval_resize": 0}})
    assert asked.recorded()["neighbours_mined_on"] == {"crop": 12, "resize": 12}


def test_a_pretrained_view_far_above_the_images_size_is_refused_as_a_mining_crop_is():
    """A pre-trained run of 72 px images scores on 72 px views: mined on 8 px digits so, nine times their size, the
    neighbours' batches ran out of memory where --mining_crop 72 is refused. A --mining_crop asks for another view."""
    saved = {"arch": "resnet18_cifar", "width": 4, "size_crops": [72, 32], "eval_crop": 0, "eval_resize": 0}
    method, _ = build("scan")
    stage_one = {name: value for name, value in method.state_dict().items() if name.startswith("backbone.")}
    with pytest.raises(ConfigError, match=r"^--pretrained 'RUN' scores its embedding on 72 px views, more than 8 "
                                          r"times this dataset's 8 px images, .*give --mining_crop \(at most 64\)$"):
        method.load_pretrained("RUN", "RUN/checkpoint.pth", {"model": stage_one, "method": "swav", "args": saved})
    at_64 = {**saved, "size_crops": [64, 32]}
    method.load_pretrained("RUN", "RUN/checkpoint.pth", {"model": stage_one, "method": "swav", "args": at_64})
    assert method.recorded()["neighbours_mined_on"] == {"crop": 64, "resize": 64}
    asked, _ = build("scan", None, "--mining_crop", "8")
    asked.load_pretrained("RUN", "RUN/checkpoint.pth", {"model": stage_one, "method": "swav", "args": saved})
    assert asked.recorded()["neighbours_mined_on"] == {"crop": 8, "resize": 8}


def test_a_mining_crop_the_backbone_cannot_take_is_refused_before_training():
    """It failed in AlexNet's pooling at the first step, after config.yaml was written."""
    method, _ = build("scan", None, "--arch", "alexnet_bn", "--size_crops", "64", "--mining_crop", "8")
    with pytest.raises(ConfigError, match=r"^--mining_crop 8: --arch alexnet_bn takes images of 63 px or more"):
        method.check_training_settings()


def test_neighbours_are_kept_by_the_checkpoint_and_checked_on_load():
    method, _ = build("scan", None, "--num_neighbours", "3")
    method.before_step(Progress(0, 0, 0, 4))
    state = method.extra_state()
    assert state["neighbours"].shape == (64, 4)
    fresh, _ = build("scan", None, "--num_neighbours", "3")
    fresh.load_extra_state(state)
    assert torch.equal(fresh.neighbours, method.neighbours)
    other, _ = build("scan", None, "--num_neighbours", "4")
    with pytest.raises(ValueError, match="neighbours are"):
        other.load_extra_state(state)


def test_a_ranks_slice_gets_the_global_batchs_views_and_neighbours():
    """Views and neighbour draws come from the global batch's parameters: two half batches at their offsets give
    what the whole batch gives (what makes a run independent of the world size), the same draws and operations;
    the values agree to the last bit or one float32 step (the vectorised kernels sum in another order when a
    batch of another size goes through them)."""
    whole_method, train = build("scan", None, "--num_neighbours", "5", "--cutout", "4")
    whole_method.before_step(Progress(0, 0, 0, 4))
    indices = torch.arange(10, 26)
    whole = whole_method.prepare(Batch(train.images[indices], train.labels[indices], indices, 16, 0))
    for start in (0, 8):
        half_method, _ = build("scan", None, "--num_neighbours", "5", "--cutout", "4")
        half_method.neighbours = whole_method.neighbours
        part = indices[start:start + 8]
        half = half_method.prepare(Batch(train.images[part], train.labels[part], part, 16, start))
        for ours, reference in zip(half, whole):
            assert torch.allclose(ours, reference[start:start + 8], rtol=0, atol=1e-6)


def test_neighbour_views_come_from_the_mined_candidates():
    method, train = build("scan", None, "--num_neighbours", "3", "--strong_ops", "0", "--cutout", "0")
    method.before_step(Progress(0, 0, 0, 4))
    torch.manual_seed(5)
    indices = torch.arange(0, 64)
    method.augment.sample = lambda n, h, w: randaugment.StrongParams(  # no flip: views are the normalised images
        torch.zeros(n, dtype=torch.bool), torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, 0, dtype=torch.float64),
        torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long))
    _, partners = method.prepare(Batch(train.images, train.labels, indices, 64, 0))
    normalised = (train.images.float() / 255 - 0.5) / 0.25
    for i in range(64):
        matches = [j for j in method.neighbours[i].tolist() if torch.equal(partners[i], normalised[j])]
        assert matches, i


def test_the_head_is_chosen_on_consistency_minus_entropy_as_upstreams_selection():
    """Upstream's scan_evaluate ranks heads by consistency - entropy (weight 1), whatever the training weight: a
    head that fits its neighbours better is not passed over for a more balanced one, as the weighted loss
    (consistency - 5 entropy) would."""
    method, train = build("scan", None, "--num_neighbours", "3", "--num_heads", "3")
    method.before_step(Progress(0, 0, 0, 1))
    indices = torch.arange(0, 32)
    batch = Batch(train.images[indices], train.labels[indices], indices, 32, 0)
    inputs = method.prepare(batch)
    method(inputs, batch, Progress(0, 0, 0, 1))
    method.on_epoch_end(0)
    with torch.no_grad():
        anchors, partners = (method.backbone(x) for x in inputs)
        by_hand = []
        for head in method.heads:
            _, consistency, entropy = scan_loss(head(anchors), head(partners), 5.0)
            by_hand.append(float(consistency - entropy))
    assert method.last_head_losses == pytest.approx(by_hand, abs=1e-5)
    assert method.chosen_head() == min(range(3), key=by_hand.__getitem__)


def test_selflabel_takes_the_chosen_head_of_a_scan_run(tmp_path):
    scan, _ = build("scan", None, "--num_heads", "3")
    state = {"model": scan.state_dict(), "method_state": {"last_head_losses": [0.5, -1.0, 0.2]}, "method": "scan"}
    selflabel, _ = build("scan_selflabel")
    weights = selflabel.pretrained_weights("RUN", state)
    assert torch.equal(weights["head.weight"], scan.heads[1].weight)
    assert torch.equal(weights["head.bias"], scan.heads[1].bias)
    assert not any(key.startswith("heads.") for key in weights)
    with pytest.raises(ConfigError, match="starts from a scan run"):
        selflabel.pretrained_weights("RUN", {"model": {"backbone.x": torch.zeros(1)}, "method": "swav"})
    # Other class-assignment runs have heads too (SeLa's are even named alike): refused by their method, not their keys.
    for method in ("sela", "selfclassifier"):
        with pytest.raises(ConfigError, match=f"trained by method '{method}'; scan_selflabel starts from a scan run"):
            selflabel.pretrained_weights("RUN", {**state, "method": method})
    # A scan checkpoint saved before its first epoch ended has no losses to choose by (head 0 would be taken blind).
    with pytest.raises(ConfigError, match="holds no head losses to choose a head by"):
        selflabel.pretrained_weights("RUN", {**state, "method_state": {"last_head_losses": []}})


def test_selflabel_head_runs_in_float32_under_bf16_autocast(monkeypatch):
    """Stage 3 on a GPU runs the backbone in bf16 (`--amp auto`); the head, whose logits decide which weak views pass
    the 0.99 threshold, runs in float32 on the bf16 features, as stage 2's heads (upstream: all float32)."""
    from types import SimpleNamespace

    from clusterlab.methods import scan_selflabel

    method, _ = build("scan_selflabel")
    seen = []

    def capture(weak_logits, strong_logits, *rest):
        seen.append((weak_logits, strong_logits))
        return confident_cross_entropy(weak_logits, strong_logits, *rest)

    monkeypatch.setattr(scan_selflabel, "confident_cross_entropy", capture)
    weak, strong = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        method.forward((weak, strong), SimpleNamespace(global_size=8), Progress(0, 0, 0, 4))
        features = method.backbone(weak)
    (weak_logits, strong_logits), = seen
    assert features.dtype == torch.bfloat16 and weak_logits.dtype == strong_logits.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(weak_logits, method.head(features.float()))


def test_ema_moves_the_weights_and_returns_the_buffers_as_upstream():
    """After an optimiser step w -> w', `after_step` sets the weights to alpha s + (1 - alpha) w' (s: the shadow,
    the weights before training) and the buffers back to their values before training (upstream's apply_shadow)."""
    method, train = build("scan_selflabel", None, "--ema", "true", "--ema_alpha", "0.9")
    method.before_step(Progress(0, 0, 0, 4))
    before = {k: v.clone() for k, v in method.state_dict().items()}
    with torch.no_grad():
        method.backbone(torch.randn(8, 1, 8, 8))  # batch norm updates its running statistics
        for p in method.parameters():
            p.add_(1.0)
    method.after_step(Progress(0, 0, 0, 4))
    names = dict(method.named_parameters())
    for key, value in method.state_dict().items():
        if key in names:
            assert torch.allclose(value, 0.9 * before[key] + 0.1 * (before[key] + 1.0), atol=1e-6), key
        else:
            assert torch.equal(value, before[key]), key


def selflabel_trainer(run_dir, threshold=0.1, ema="true") -> engine.Trainer:
    args = parse_args("cluster", ["--method", "scan_selflabel", *TINY, "--batch_size", "16", "--epochs", "1",
                                  "--ema", ema, "--ema_alpha", "0.5", "--confidence_threshold", str(threshold),
                                  "--cutout", "4", "--lr", "0.01", "--output_dir", str(run_dir)])
    engine.seed_everything(args.seed)
    train = images()
    method = METHODS["scan_selflabel"](args, DataInfo.of(train), torch.device("cpu"))
    run_dir.mkdir(parents=True, exist_ok=True)
    return engine.Trainer(method, args, distributed.init("cpu"), run_dir, train, kind="cluster")


def test_ema_is_exact_across_a_mid_epoch_resume(tmp_path, stop_after):
    torch.set_num_threads(1)
    reference = selflabel_trainer(tmp_path / "reference")
    assert reference.train_one_epoch(0)
    stopped = selflabel_trainer(tmp_path / "stopped")
    stop_after(stopped, 2)
    assert not stopped.train_one_epoch(0) and stopped.position == (0, 2)
    stopped.save(0, 2)
    stop_after(None)
    resumed = selflabel_trainer(tmp_path / "stopped")
    assert resumed.resume() == (0, 2)
    assert resumed.method.shadow is not None  # the shadow came from the checkpoint, not from the resumed weights
    assert resumed.train_one_epoch(0, start_step=2)
    ours, final = resumed.state_dict(1, 0), reference.state_dict(1, 0)
    assert final["method_state"]["ema_shadow"] is not None
    for key in ("model", "optimizer", "method_state", "method_random"):
        assert_same_tensors(ours[key], final[key], key)


def test_a_batch_without_a_confident_view_moves_no_weight_and_an_epoch_of_them_stops_the_run(tmp_path):
    """Adam's step on the zero loss moved every weight anyway (the L2 weight decay alone by about lr each: a whole
    run wore the scan network down and ended "finished"). An epoch without a confident view stops in one line."""
    torch.set_num_threads(1)
    trainer = selflabel_trainer(tmp_path / "run", threshold=0.999999, ema="false")
    before = {name: p.detach().clone() for name, p in trainer.method.named_parameters()}
    with pytest.raises(ConfigError, match=r"^epoch 1: no weak view's largest probability exceeded "
                                          r"--confidence_threshold 0.999999 \(the highest was 0\.\d{4}\)"):
        trainer.train_one_epoch(0)
    assert trainer.optimizer.state_dict()["state"] == {}
    for name, p in trainer.method.named_parameters():
        assert torch.equal(p, before[name]), name


def test_only_the_steps_with_a_confident_view_move_the_weights(tmp_path, monkeypatch):
    """Every second global batch without a confident view: Adam steps on the others only, and the epoch ends."""
    from clusterlab.methods import scan_selflabel

    calls, real = [], scan_selflabel.confident_cross_entropy

    def every_second_without(weak, strong, threshold, balance):
        loss, confident = real(weak, strong, threshold, balance)
        calls.append(len(calls) % 2 == 0)
        return (loss, confident) if calls[-1] else (0 * loss, 0 * confident)

    monkeypatch.setattr(scan_selflabel, "confident_cross_entropy", every_second_without)
    trainer = selflabel_trainer(tmp_path / "run", ema="false")
    assert trainer.train_one_epoch(0)
    steps = {int(state["step"]) for state in trainer.optimizer.state_dict()["state"].values()}
    assert len(calls) == 4 and steps == {sum(calls)} == {2}


def test_a_step_the_method_did_not_take_leaves_the_count_of_overflowing_steps(tmp_path):
    """Under fp16 a skipped step keeps the scaler's scale, which read as a step without overflow and cleared the
    count the 32-in-a-row guard stops on: overflowing steps between batches without a confident view never
    stopped the run, the scale halving on."""
    trainer = selflabel_trainer(tmp_path / "run")
    trainer.loss_scale = 1024.0
    for taken, scale, in_a_row in [(True, 512.0, 1), (False, 512.0, 1), (True, 256.0, 2), (True, 256.0, 0)]:
        trainer.step_taken = taken
        trainer.note_scale(scale)
        assert (trainer.skipped_in_a_row, trainer.loss_scale) == (in_a_row, scale)


def test_file_backed_datasets_are_refused_in_one_line():
    method, train = build("scan")
    files = type(train)(**{**{f: getattr(train, f) for f in ("name", "split", "labels", "num_classes", "channels",
                                                              "image_size", "mean", "std", "class_names")},
                           "files": ["a.png"] * len(train)})
    with pytest.raises(ConfigError, match="held in memory") as caught:
        method.attach_data(files)
    assert "\n" not in str(caught.value)


def test_too_many_neighbours_are_refused():
    with pytest.raises(ConfigError, match="--num_neighbours 64"):
        build("scan", None, "--num_neighbours", "64")


# ---- the three stages end to end -------------------------------------------------------------------------------------

@pytest.mark.slow  # the runs' records name the git commit: git runs
def test_embedding_then_scan_then_selflabel_are_scored_by_eval_cluster(tmp_path):
    """SwAV on digits, SCAN on its backbone (3 heads), self-labelling from the chosen head; eval_cluster.py scores
    every head of both and marks the chosen one; the stage-3 model starts from the stage-2 weights."""
    torch.set_num_threads(1)
    pretrain, cluster, evaluate = entry_module("main_pretrain"), entry_module("main_cluster"), \
        entry_module("eval_cluster")
    small = ["--dataset", "digits", "--width", "4", "--device", "cpu", "--log_every", "100"]
    pretrain.main(["--config", "configs/swav_digits.yaml", *small, "--epochs", "2",
                   "--output_dir", str(tmp_path / "swav")])
    cluster.main(["--method", "scan", *small, "--epochs", "2", "--num_heads", "3", "--num_neighbours", "5",
                  "--pretrained", str(tmp_path / "swav"), "--output_dir", str(tmp_path / "scan")])
    scan_state = torch.load(tmp_path / "scan" / "checkpoint.pth", weights_only=True)
    losses = scan_state["method_state"]["last_head_losses"]
    chosen = min(range(3), key=losses.__getitem__)
    assert scan_state["method_state"]["neighbours"].shape == (898, 6)
    cluster.main(["--method", "scan_selflabel", *small, "--epochs", "1", "--batch_size", "128",
                  "--confidence_threshold", "0.2", "--pretrained", str(tmp_path / "scan"),
                  "--output_dir", str(tmp_path / "selflabel")])
    for run in ("scan", "selflabel"):
        evaluate.main(["--run", str(tmp_path / run), "--plot", "false"])
    scan_records = [json.loads(line) for line in (tmp_path / "scan" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["protocol"]["head"] for r in scan_records if r["protocol"]["selection"] == "all-heads") == [0, 1, 2]
    assert [r["protocol"]["head"] for r in scan_records if r["protocol"].get("chosen")] == [chosen]
    records = [json.loads(line) for line in (tmp_path / "selflabel" / "metrics.jsonl").read_text().splitlines()]
    # one head: its own record and the chosen one's, the same numbers
    assert [r["protocol"]["selection"] for r in records] == ["all-heads", "lowest-loss"]
    assert records[0]["metrics"] == records[1]["metrics"] and records[0]["split"] == "test"
    for key in ("acc", "nmi", "ari"):
        assert 0.0 <= records[0]["metrics"][key] <= 1.0
    assert records[0]["metrics"]["acc"] > 0.1  # better than nothing: digits has 10 balanced classes


@pytest.mark.slow  # the run's record names the git commit: git runs
def test_a_later_stage_without_pretrained_weights_says_it_starts_from_random_ones(tmp_path, capsys):
    torch.set_num_threads(1)
    cluster = entry_module("main_cluster")
    flags = ["--method", "scan", "--dataset", "digits", "--width", "4", "--device", "cpu", "--num_heads", "1",
             "--num_neighbours", "5", "--output_dir", str(tmp_path / "scan")]
    cluster.main([*flags, "--epochs", "1"])
    assert ("note: no --pretrained: scan starts from random weights; its recipe starts from an embedding run"
            in capsys.readouterr().out)
    cluster.main([*flags, "--epochs", "2"])  # resumed: its own weights
    assert "no --pretrained" not in capsys.readouterr().out


def test_adam_is_torchs_adam_with_the_flags_lr_and_l2_weight_decay():
    """One step of `--optimizer adam` equals torch.optim.Adam(lr, weight_decay) by hand: the first step moves each
    weight by lr * sign(g + wd w) (m / sqrt(v) = +-1 up to eps)."""
    from clusterlab.optim import build_optimizer

    args = parse_args("cluster", ["--method", "scan", *TINY, "--output_dir", "unused", "--lr", "0.01",
                                  "--weight_decay", "0.5"])
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    optimizer = build_optimizer([{"params": [weight]}], args)
    assert isinstance(optimizer, torch.optim.Adam)
    weight.grad = torch.tensor([0.1, 2.0, -5.0])
    optimizer.step()
    regularised = torch.tensor([0.1 + 0.5, 2.0 - 1.0, -5.0 + 1.5])
    expected = torch.tensor([1.0, -2.0, 3.0]) - 0.01 * regularised.sign()
    assert torch.allclose(weight.detach(), expected, atol=1e-6)


def test_fashion_mnist_script_chains_the_stages_and_refuses_a_missing_embedding(tmp_path):
    """scripts/scan_fashion_mnist.sh with a stand-in Python that only echoes its arguments: scan starts from EMB,
    self-labelling from the scan run, both are scored (heads, k-means and kNN); no EMB, or one without a checkpoint,
    is one line and exit 2."""
    import os
    import subprocess

    from conftest import ROOT

    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\necho "$*"\n')
    fake.chmod(0o755)
    emb, out = tmp_path / "emb", tmp_path / "out"
    env = {**os.environ, "PY": str(fake), "OUT": str(out)}
    script = ["bash", str(ROOT / "scripts" / "scan_fashion_mnist.sh")]
    for given in ({}, {"EMB": str(emb)}):
        refused = subprocess.run(script, env={**env, **given}, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    emb.mkdir()
    (emb / "checkpoint.pth").touch()
    done = subprocess.run(script, env={**env, "EMB": str(emb)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    scan, selflabel = (out / "scan.log").read_text(), (out / "selflabel.log").read_text()
    assert f"main_cluster.py --config configs/scan_fashion_mnist.yaml --pretrained {emb} --output_dir {out}/scan" in scan
    assert (f"main_cluster.py --config configs/scan_selflabel_fashion_mnist.yaml --pretrained {out}/scan "
            f"--output_dir {out}/selflabel") in selflabel
    for stage, log in (("scan", scan), ("selflabel", selflabel)):
        common = f"--run {out}/{stage} --device cpu --skip_recorded true"
        assert f"eval_cluster.py {common} --plot false\n" in log
        assert f"eval_cluster.py {common} --plot false --assignment kmeans\n" in log
        assert f"eval_knn.py {common} --k 200 20\n" in log
    assert int((out / "scan.time").read_text()) >= 0 and int((out / "selflabel.time").read_text()) >= 0


def test_scan_losses_on_a_device_never_wait_for_it():
    # The meta device stands for a GPU: a copy from the host is counted, and reading a value back (a boolean mask,
    # a test on a total) fails there outright.
    anchors = torch.empty(32, 10, device="meta", requires_grad=True)
    neighbours = torch.empty(32, 10, device="meta")
    with HostCopies() as copies:
        total, _, _ = scan_loss(anchors, neighbours, 5.0)
        loss, _ = confident_cross_entropy(neighbours, anchors, 0.99, balance=True)
        (total + loss).backward()
    assert copies.blocking == 0 and anchors.grad.shape == anchors.shape


def test_a_resumed_stage_two_says_when_its_pretrained_run_has_moved_on(tiny_run, tmp_path):
    """SCAN trained on a SwAV run, then the SwAV run extended by an epoch: the same SCAN command (a requeued chain
    resubmits it) trains on from its own checkpoint without a word that --pretrained now holds other weights."""
    first = copy_run(tiny_run, tmp_path / "swav")
    scan = ["--method", "scan", "--dataset", "digits", "--width", "4", "--batch_size", "64", "--size_crops", "8",
            "--epochs", "1", "--device", "cpu", "--pretrained", first, "--output_dir", tmp_path / "scan"]
    assert_ok(run_script("main_cluster.py", *scan))
    again = run_script("main_cluster.py", *scan)
    assert_ok(again)
    assert "--pretrained" not in again.stdout  # nothing moved
    assert_ok(run_script("main_pretrain.py", *TINY_SWAV, "--epochs", "3", "--output_dir", first))
    again = run_script("main_cluster.py", *scan)
    assert_ok(again)
    checkpoint = (first / "checkpoint.pth").resolve()
    assert (f"note: --pretrained {str(first)!r} now holds {checkpoint} at the end of epoch 3; this run started "
            f"from {checkpoint} at the end of epoch 2 and goes on from its own checkpoint") in again.stdout, again.stdout


def test_a_confidence_equal_to_the_threshold_is_not_confident():
    """Upstream keeps a sample whose largest probability is above the threshold (max_prob > threshold)."""
    _, mask = confident_targets(torch.zeros(3, 2), 0.5)  # every probability exactly 0.5
    assert not mask.any()


def test_a_checkpoint_saved_before_the_first_epoch_ended_has_no_chosen_head(tiny_run, tmp_path, run_in_process,
                                                                              monkeypatch, capsys):
    """Heads are chosen by the last epoch's losses: a SCAN run stopped in its first epoch holds none, so eval_cluster
    scores every head, marks none chosen (it marked head 0, whatever the heads' losses so far) and says why."""
    from test_resume import signal_when

    signal_when(monkeypatch, "step", lambda trainer, batch, progress: progress.step == 2)
    scan = tmp_path / "scan"
    stopped = run_in_process("main_cluster.py", "--method", "scan", "--dataset", "digits", "--width", 4,
                             "--batch_size", 64, "--size_crops", 8, "--num_heads", 3, "--epochs", 1, "--device",
                             "cpu", "--pretrained", tiny_run, "--output_dir", scan)
    assert stopped.returncode == 75, stopped.stderr
    assert torch.load(scan / "checkpoint.pth", weights_only=True)["method_state"]["last_head_losses"] == []
    entry_module("eval_cluster").main(["--run", str(scan), "--plot", "false"])
    out = capsys.readouterr().out
    assert "was saved before its first epoch ended: no head losses to choose a head by" in out and "chosen" not in \
        out.replace("none is marked chosen", "")
    records = [json.loads(line) for line in (scan / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["protocol"]["head"] for r in records) == [0, 1, 2]
    assert not any(r["protocol"].get("chosen") for r in records)


def test_a_resume_with_another_mining_crop_says_the_neighbours_are_kept(tiny_run, tmp_path):
    """The neighbours come from the checkpoint: a resumed run with another --mining_crop keeps them, and says so (it
    went on in silence while config.yaml recorded the new crop)."""
    scan = ["--method", "scan", "--dataset", "digits", "--width", "4", "--batch_size", "64", "--size_crops", "8",
            "--device", "cpu", "--pretrained", tiny_run, "--output_dir", tmp_path / "scan"]
    assert_ok(run_script("main_cluster.py", *scan, "--epochs", "1"))
    resumed = run_script("main_cluster.py", *scan, "--epochs", "2", "--mining_crop", "6")
    assert_ok(resumed)
    assert ("note: --mining_crop 6: this run's neighbours were mined on 8 px views at its first start and are kept"
            in resumed.stdout), resumed.stdout
    assert "neighbours of 898 images mined" not in resumed.stdout


def test_a_stage_two_on_another_datasets_run_says_so(tiny_run, tmp_path):
    """A pre-trained run of other images is taken (a transfer may be meant) but not in silence: the weights and the
    normalisation come from them. A run of the same images under other labels (cifar100_20 of cifar100) says
    nothing: datasets compare by their images (same_images)."""
    from clusterlab.data.registry import same_images

    fashion = fabricate.make_fashion_mnist(tmp_path / "fm", n_train=64, n_test=20, seed=4)
    result = run_script("main_cluster.py", "--method", "scan", "--dataset", "fashion_mnist", "--data_path", fashion,
                        "--width", "4", "--batch_size", "32", "--size_crops", "8", "--epochs", "1", "--device", "cpu",
                        "--num_neighbours", "5", "--pretrained", tiny_run, "--output_dir", tmp_path / "scan")
    assert_ok(result)
    assert (f"note: --pretrained {str(tiny_run)!r} was trained on digits, this run trains on fashion_mnist: it "
            f"starts from weights learnt on the other images, and normalises with mean [") in result.stdout
    assert same_images("cifar100_20", "cifar100") and not same_images("cifar100", "cifar10")


def test_a_pretrained_run_that_diverged_is_refused_before_mining(tiny_run, tmp_path):
    """Weights that are finite but overflow (a run that diverged at an epoch's last step saved them): the neighbours
    were mined from NaN features without a word, and the run stopped at its first step blaming its own loss."""
    from clusterlab import checkpoint

    diverged = copy_run(tiny_run, tmp_path / "diverged")
    state = checkpoint.load(diverged / "checkpoint.pth")
    state["model"] = {name: value * 1e30 if name.startswith("backbone.") and value.is_floating_point() else value
                      for name, value in state["model"].items()}
    checkpoint.save(state, diverged / "checkpoint.pth", kind=state["kind"], method=state["method"])
    result = run_script("main_cluster.py", "--method", "scan", "--dataset", "digits", "--width", "4", "--batch_size",
                        "64", "--size_crops", "8", "--epochs", "1", "--device", "cpu", "--pretrained", diverged,
                        "--output_dir", tmp_path / "scan")
    assert_user_error(result, "main_cluster.py", f"the backbone of --pretrained {str(diverged)!r} gives non-finite "
                      f"features for 898 of 898 training images", "the run diverged", "no neighbours to mine")
