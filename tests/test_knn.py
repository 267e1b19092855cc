"""Weighted kNN (eval/knn.py) against a naive per-sample loop; chunking; top-1/top-5; 2 gloo processes vs 1; the
memory-bank monitor on the bank's raw rows. The neighbour search under it (ops/knn.py) against a full stable sort:
ties, the excluded own row, every sample's neighbours in its own dataset, chunk sizes that do not divide the
queries, and 2 processes against 1.

Class scores: 1e-5 relative to a float64 loop. Accuracies are ratios of counts and are compared exactly. The
neighbour search is compared exactly on rows whose products are exact in float32 (ties on purpose), and to 1e-6 on
random unit rows.
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from clusterlab.data import ImageSet
from clusterlab.eval.knn import knn_accuracies, knn_accuracy, knn_class_scores, monitor
from clusterlab.data.augment import EvalView
from clusterlab.errors import ConfigError
from clusterlab.methods.superand import bank_entropy
from clusterlab.ops.knn import ARGMAX_K, dataset_neighbours, query_chunks, top_k_by_argmax, top_k_rows, topk_neighbours
from clusterlab.programs.eval_knn import memory_bank_features
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture

CLASSES = 10


def naive_scores(train, labels, test, num_classes, k, temperature):
    """For each test sample: cosine similarity to every training sample, the k largest, exp(s / T) summed per
    class (NPID's weighted vote), in plain python."""
    out = []
    for x in test.double().tolist():
        sims = [(sum(a * b for a, b in zip(x, t)), j) for j, t in enumerate(train.double().tolist())]
        sims.sort(key=lambda pair: -pair[0])
        votes = [0.0] * num_classes
        for s, j in sims[:k]:
            votes[int(labels[j])] += math.exp(s / temperature)
        out.append(votes)
    return torch.tensor(out, dtype=torch.float64)


def make_data(n_train=60, n_test=23, dim=5, seed=0):
    """Class-dependent features (so top-1 is neither 0 nor 1), L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, dim, generator=g)
    train_labels = torch.randint(0, CLASSES, (n_train,), generator=g)
    test_labels = torch.randint(0, CLASSES, (n_test,), generator=g)
    train = F.normalize(centres[train_labels] + 1.2 * torch.randn(n_train, dim, generator=g), dim=1)
    test = F.normalize(centres[test_labels] + 1.2 * torch.randn(n_test, dim, generator=g), dim=1)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (7, 0.1), (20, 0.5), (200, 0.07), (20, 0.005)])
def test_class_scores_equal_naive_loop(k, temperature):
    """Up to one factor per row, exp(s_1 / T) of the nearest neighbour: at T = 0.005, exp(s / T) itself is beyond
    float32's range (the naive loop sums in float64)."""
    train, train_labels, test, test_labels = make_data()
    got = knn_class_scores(train, train_labels, test, CLASSES, k=k, temperature=temperature)
    expected = naive_scores(train, train_labels, test, CLASSES, min(k, len(train)), temperature)
    assert torch.isfinite(got).all()
    # Similarities round to float32 (about 1e-7) before the division by T; weights below 1e-30 of the row's largest
    # underflow in float32.
    relative = (got.double() / got.max(dim=1, keepdim=True).values, expected / expected.max(dim=1, keepdim=True).values)
    torch.testing.assert_close(*relative, rtol=max(1e-5, 5e-7 / temperature), atol=1e-30)
    assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))


def test_a_class_voted_for_far_below_the_nearest_stays_in_the_top_5():
    """Cosines 0.5 (class 0) and -0.6 (class 9) at T = 0.01: 9's weight, exp(-110) of the nearest's, underflowed to 0
    in float32 and tied with the eight classes nobody voted for, so the top-5 list left it out."""
    angle = [math.acos(0.5), math.acos(-0.6)]
    train = torch.tensor([[math.cos(a), math.sin(a)] for a in angle])
    test = torch.tensor([[1.0, 0.0]])
    votes = naive_scores(train, torch.tensor([0, 9]), test, CLASSES, 2, 0.01)
    assert votes[0, 9] > 0 and votes[0, 9] < votes[0, 0] * 1e-45  # voted for, beyond float32's range of the nearest
    result = knn_accuracy(train, torch.tensor([0, 9]), test, torch.tensor([9]), CLASSES, k=2, temperature=0.01)
    assert result == {"top1": 0.0, "top5": 1.0}


@pytest.mark.parametrize("max_elements", [1, 60, 61, 7 * 60, 10 ** 9])
def test_chunking_gives_the_same_scores(max_elements):
    """max_elements=1 or 60 (train size): one test sample per chunk; 7 * 60: chunks of 7 with a ragged end."""
    train, train_labels, test, _ = make_data()
    whole = knn_class_scores(train, train_labels, test, CLASSES, k=9)
    chunked = knn_class_scores(train, train_labels, test, CLASSES, k=9, max_elements=max_elements)
    # Different matmul shapes round differently: equal to float32 precision (measured up to 1.5e-6 with some CPUs'
    # kernels).
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)


def naive_accuracy(train, train_labels, test, test_labels, k, temperature):
    scores = naive_scores(train, train_labels, test, CLASSES, k, temperature)
    order = scores.argsort(dim=1, descending=True)
    top1 = sum(int(order[i, 0] == test_labels[i]) for i in range(len(test)))
    top5 = sum(int(test_labels[i] in order[i, :5].tolist() and scores[i, test_labels[i]] > 0) for i in range(len(test)))
    return top1 / len(test), top5 / len(test)


def test_top1_top5_equal_naive():
    train, train_labels, test, test_labels = make_data(seed=1)
    got = knn_accuracy(train, train_labels, test, test_labels, CLASSES, k=15, temperature=0.1)
    top1, top5 = naive_accuracy(train, train_labels, test, test_labels, 15, 0.1)
    assert got == {"top1": top1, "top5": top5}
    assert 0 < got["top1"] < got["top5"] < 1, got


def test_several_k_from_one_search_equal_one_search_each():
    """The widest search's first k neighbours are the k nearest, ties included: features rounded to quarters (exact
    in binary, so the similarities are too) give many equal similarities, at the k-th place too."""
    train, train_labels, test, test_labels = make_data(n_train=80, seed=3)
    train, test = (torch.round(x * 4) / 4 for x in (train, test))
    ks = [200, 1, 7, 20, 79]
    ranked = (test @ train.t()).sort(dim=1, descending=True).values
    assert (ranked[:, 6] == ranked[:, 7]).any() and (ranked[:, 19] == ranked[:, 20]).any()  # ties at k=7 and k=20
    together = knn_accuracies(train, train_labels, test, test_labels, CLASSES, ks, temperature=0.1)
    assert list(together) == ks
    for k in ks:
        assert together[k] == knn_accuracy(train, train_labels, test, test_labels, CLASSES, k=k, temperature=0.1), k


def test_top5_counts_only_classes_a_neighbour_votes_for():
    """With three classes every class is in a top-5 list; a hit is counted where one of the k neighbours has the
    true class, whatever the classes' numbering (upstream counts the unvoted classes that fill the list)."""
    train, train_labels, test, test_labels = make_data()
    keep = lambda t: t % 3  # noqa: E731 - three classes
    got = knn_accuracy(train, keep(train_labels), test, keep(test_labels), 3, k=2)
    neighbours = (test @ train.t()).topk(2, dim=1).indices
    voted = (keep(train_labels)[neighbours] == keep(test_labels)[:, None]).any(1).double().mean().item()
    assert got["top5"] == pytest.approx(voted) and 0 < voted < 1
    renumbered = lambda t: (keep(t) + 1) % 3  # noqa: E731
    assert knn_accuracy(train, renumbered(train_labels), test, renumbered(test_labels), 3, k=2) == got
    one_neighbour = knn_accuracy(train, train_labels, test, test_labels, CLASSES, k=1)
    assert one_neighbour["top5"] == one_neighbour["top1"]


def test_perfect_features_give_perfect_accuracy():
    labels = torch.arange(12) % CLASSES
    features = F.one_hot(labels, CLASSES).float()
    got = knn_accuracy(features, labels, features, labels, CLASSES, k=2, temperature=0.1)
    assert got == {"top1": 1.0, "top5": 1.0}


# ---- 2 processes: each scores its share of the test set -------------------------------------------------------------

N_TESTS = (23, 1)  # 23 test samples (shares 12 and 11) and 1 (one rank has nothing to score)


def _worker(rank, world, datasets, ops_inputs):
    return {"accuracy": [knn_accuracy(*data, CLASSES, k=15, temperature=0.1) for data in datasets],
            "ops": _ops_results(rank, world, *ops_inputs)}


@pytest.fixture(scope="module")
def two_processes():
    """One start of 2 gloo processes for both tests: (inputs, each rank's results)."""
    g = torch.Generator().manual_seed(5)
    ops_inputs = tuple(F.normalize(torch.randn(n, 6, generator=g), dim=1) for n in (23, 40, 31))
    datasets = [make_data(n_test=n, seed=2) for n in N_TESTS]
    return (datasets, ops_inputs), run_distributed(_worker, 2, datasets, ops_inputs)


def test_two_processes_equal_one_process(two_processes):
    (datasets, _), outputs = two_processes
    results = [output["accuracy"] for output in outputs]
    for index, data in enumerate(datasets):
        one = knn_accuracy(*data, CLASSES, k=15, temperature=0.1)
        assert results[0][index] == results[1][index] == one
    assert 0 < results[0][0]["top1"] < 1


# ---- the memory-bank monitor ----------------------------------------------------------------------------------------

class BankMethod(torch.nn.Module):
    """What the monitor reads of a memory-bank method: the bank, and one fixed test embedding for every image."""

    eval_view, monitor_temperature = EvalView.of(8), 0.1

    def __init__(self, bank: torch.Tensor, query: torch.Tensor, written: torch.Tensor | None = None):
        super().__init__()
        self.memory_bank, self.query = bank, query
        self.memory_bank_written = torch.ones(len(bank), dtype=torch.bool) if written is None else written
        self.info = SimpleNamespace(mean=(0.5,), std=(0.25,), fingerprint="")

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.query.expand(len(images), -1)


def grey_images(labels: list[int]) -> ImageSet:
    return ImageSet("fake", "train", torch.tensor(labels), 2, 1, 8, (0.5,), (0.25,), ["a", "b"],
                    images=torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8))


def test_memory_bank_monitor_and_eval_knn_read_the_raw_rows_that_a_step_wrote():
    """Upstream's kNN monitor (and eval_knn.py --train_features memory_bank) use the bank rows as they are. Row 0
    (class 0) is 5 units long at cosine 0.6 to the query, row 1 (class 1) unit-length at cosine 0.9: the dot product
    (3 against 0.9) makes row 0 the nearest neighbour, the cosine would pick row 1. A row no step has written (its
    image left out of the first epoch's full batches; upstream writes every row in the first epoch) does not vote:
    row 0 as such leaves row 1 the nearest."""
    bank = torch.tensor([[3.0, 4.0], [0.9, 0.19 ** 0.5]])
    method = BankMethod(bank, torch.tensor([[1.0, 0.0]]))
    train, test = grey_images([0, 1]), grey_images([0])
    raw = monitor(method, train, test, k=1, source="memory_bank", device=torch.device("cpu"))
    assert raw["top1"] == 1.0
    normalised = knn_accuracy(F.normalize(bank, dim=1), train.labels, method.query, test.labels, 2, k=1)
    assert normalised["top1"] == 0.0
    loaded = SimpleNamespace(method=method, args=SimpleNamespace(method="npid", train_split="train", dataset="fake"))
    rows, positions = memory_bank_features(loaded, train)
    assert torch.equal(rows, bank) and positions.tolist() == [0, 1]
    method.memory_bank_written = torch.tensor([False, True])
    assert monitor(method, train, test, k=1, source="memory_bank", device=torch.device("cpu"))["top1"] == 0.0
    rows, positions = memory_bank_features(loaded, train)
    assert torch.equal(rows, bank[1:]) and positions.tolist() == [1]


def test_a_memory_bank_is_not_scored_against_the_labels_of_another_training_set():
    """A bank's row i belongs to the run's training image i: a set of as many images in another order (or other
    labels) is refused, the run's own set (or a run written before checkpoints kept the digest) is read."""
    bank = torch.eye(2)
    method = BankMethod(bank, torch.eye(2))
    own, reordered = grey_images([0, 1]), grey_images([1, 0])
    loaded = SimpleNamespace(method=method, args=SimpleNamespace(method="npid", train_split="train", dataset="fake"))
    method.info = SimpleNamespace(fingerprint=own.fingerprint)
    assert torch.equal(memory_bank_features(loaded, own)[0], bank)
    with pytest.raises(ConfigError, match=f"not of fake's train split here \\(digest {reordered.fingerprint}\\)"):
        memory_bank_features(loaded, reordered)
    method.info = SimpleNamespace(fingerprint="")
    assert torch.equal(memory_bank_features(loaded, reordered)[0], bank)
    # CIFAR-100's images under their 20 superclass labels are the bank's images; CIFAR-10's are not
    loaded.args.dataset = "cifar100"
    method.info = SimpleNamespace(fingerprint=own.fingerprint)
    assert torch.equal(memory_bank_features(loaded, dataclasses.replace(reordered, name="cifar100_20"))[0], bank)
    with pytest.raises(ConfigError, match="its cifar100 training images, not of cifar10's"):
        memory_bank_features(loaded, dataclasses.replace(own, name="cifar10"))
    # a run trained on STL-10's unlabeled split, whose bank has as many rows as the train split has images: its
    # unlabelled images' embeddings voted with the train images' labels
    loaded.args.dataset, loaded.args.train_split = "fake", "unlabeled"
    with pytest.raises(ConfigError, match="trained on its 'unlabeled' split, so its bank holds no embedding of the "
                                          "train split's images; use --train_features recomputed"):
        memory_bank_features(loaded, own)


# ---- ops/knn: the one neighbour search -----------------------------------------------------------------------------

def naive_top_k(queries, bank, k, exclude=None):
    """Every query's similarities to every bank row in float64, ranked by a full stable sort of (-similarity,
    index): (similarities, indices), the own row of `exclude` left out."""
    sims, idx = [], []
    for q, x in enumerate(queries.double().tolist()):
        scored = [(sum(a * b for a, b in zip(x, row)), j) for j, row in enumerate(bank.double().tolist())
                  if exclude is None or j != int(exclude[q])]
        scored.sort(key=lambda pair: (-pair[0], pair[1]))
        sims.append([s for s, _ in scored[:k]])
        idx.append([j for _, j in scored[:k]])
    return torch.tensor(sims, dtype=torch.float64), torch.tensor(idx)


def grid_rows(n, dim, seed):
    """Rows with entries in {0, 0.5, 1}: many exactly equal dot products (ties), all exact in float32, so the order
    must come from the tie rule and not from rounding."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, dim), generator=g).float() / 2


@pytest.mark.parametrize("k", [1, 2, 3, 17, 40])
@pytest.mark.parametrize("chunk_elements", [1, 40 * 7, 40 * 23, 1 << 24])
def test_topk_neighbours_equal_a_full_sort_with_ties_to_the_lower_index(k, chunk_elements):
    """Chunks of 1, 7 (ragged end: 23 = 3 x 7 + 2), 23 (one chunk) queries; k 40 = the whole bank; k 1 and 2 by
    passes of argmax."""
    queries, bank = grid_rows(23, 4, 0), grid_rows(40, 4, 1)
    found = topk_neighbours(queries, bank, k, chunk_elements=chunk_elements)
    sims, idx = naive_top_k(queries, bank, k)
    assert torch.equal(found.indices, idx)
    assert torch.equal(found.similarities.double(), sims)  # exact: every product and sum is exact here
    ranked = naive_top_k(queries, bank, 40)[0]
    assert (ranked[:, :-1] == ranked[:, 1:]).sum() > 100  # the case is made of ties,
    assert k == 40 or (ranked[:, k - 1] == ranked[:, k]).sum() > 3  # also across the k-th place


def test_topk_neighbours_keep_the_lowest_indices_among_rows_tied_at_the_boundary():
    bank = torch.tensor([[0.0], [1.0], [0.5], [1.0], [1.0], [0.5]])
    found = topk_neighbours(torch.tensor([[1.0], [-1.0]]), bank, 4)
    assert found.indices.tolist() == [[1, 3, 4, 2], [0, 2, 5, 1]]
    assert found.similarities.tolist() == [[1.0, 1.0, 1.0, 0.5], [0.0, -0.5, -0.5, -1.0]]


def test_the_two_nearest_are_found_without_reading_the_device():
    """Self-Classifier's queue asks for them at every training step (topk_neighbours takes argmax passes up to
    ARGMAX_K); on the meta device, which holds no data, top_k_rows's test of which rows tie fails."""
    assert ARGMAX_K >= 2
    found = top_k_by_argmax(torch.empty(8, 40, device="meta"), 2)
    assert found.indices.shape == found.similarities.shape == (8, 2)
    with pytest.raises(NotImplementedError):
        top_k_rows(torch.empty(8, 40, device="meta"), 2)


def test_topk_neighbours_exclude_the_own_row():
    bank = F.normalize(torch.randn(30, 6, generator=torch.Generator().manual_seed(3)), dim=1)
    own = torch.tensor([4, 0, 29, 4])
    found = topk_neighbours(bank[own], bank, 5, exclude=own, chunk_elements=60)
    sims, idx = naive_top_k(bank[own], bank, 5, exclude=own)
    assert torch.equal(found.indices, idx)
    torch.testing.assert_close(found.similarities.double(), sims, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="30 neighbours asked among 29"):
        topk_neighbours(bank[own], bank, 30, exclude=own)


@pytest.mark.parametrize("include_self", [False, True])
def test_dataset_neighbours_of_every_sample(include_self):
    """SCAN's mining: each sample's k nearest in its own dataset. Rows of +-1 (all of norm 2, so a row's own
    similarity is the largest, and 25 rows of 16 possible values: duplicates); with include_self the sample comes
    first even where a duplicate of lower index ties with it (row 1 = row 0)."""
    features = torch.randint(0, 2, (25, 4), generator=torch.Generator().manual_seed(4)).float() * 2 - 1
    features[1] = features[0]
    found = dataset_neighbours(features, 6, include_self=include_self, chunk_elements=25 * 4)
    others = naive_top_k(features, features, 6 - include_self, exclude=torch.arange(25))[1]
    if include_self:
        assert found.indices[:, 0].tolist() == list(range(25))
        assert torch.equal(found.indices[:, 1:], others)
        assert naive_top_k(features[1:2], features, 1)[1].item() == 0  # a plain sort would put row 0 first
        assert torch.equal(found.similarities[:, 0], torch.full((25,), 4.0))
    else:
        assert torch.equal(found.indices, others)
    assert dataset_neighbours(features, 1, include_self=True).indices.tolist() == [[i] for i in range(25)]


def test_query_chunks_cover_the_queries_once_whatever_the_sizes():
    assert query_chunks(23, 40, 40 * 7) == [range(0, 7), range(7, 14), range(14, 21), range(21, 23)]
    assert query_chunks(5, 10 ** 9, 1) == [range(i, i + 1) for i in range(5)]  # at least one row per chunk
    assert query_chunks(0, 40) == []


def _ops_results(rank, world, queries, bank, features):
    return {"split": list(topk_neighbours(queries, bank, 7, chunk_elements=40 * 3, split_over_ranks=True)),
            "local": list(topk_neighbours(queries[rank::world], bank, 7, chunk_elements=40 * 3)),
            "dataset": list(dataset_neighbours(features, 4, include_self=True, chunk_elements=31 * 2,
                                               split_over_ranks=True)),
            "entropy": bank_entropy(features, 0.2, chunk_elements=31 * 2)}


def test_ops_knn_on_two_processes_equal_one_process(two_processes):
    """Split over 2 ranks, every rank gets the whole result, bit for bit the single process's (the chunks lie on
    the same grid: 23 queries in chunks of 3, 8 chunks, 4 per rank; 31 samples in chunks of 2, 16 chunks); without
    the split each rank searches its own queries. Super-AND's entropy, chunked on the same grid, too."""
    (_, (queries, bank, features)), outputs = two_processes
    results = [output["ops"] for output in outputs]
    one = {"split": topk_neighbours(queries, bank, 7, chunk_elements=40 * 3),
           "dataset": dataset_neighbours(features, 4, include_self=True, chunk_elements=31 * 2),
           "entropy": bank_entropy(features, 0.2, chunk_elements=31 * 2)}
    for rank, result in enumerate(results):
        for key in ("split", "dataset"):
            assert all(torch.equal(a, b) for a, b in zip(result[key], one[key])), (rank, key)
        assert torch.equal(result["entropy"], one["entropy"])
        local = topk_neighbours(queries[rank::2], bank, 7, chunk_elements=40 * 3)
        assert all(torch.equal(a, b) for a, b in zip(result["local"], local))


def _load_own_copy_of_run(rank: int, world_size: int, runs: list[str]) -> str:
    from clusterlab.errors import UserError
    from clusterlab.eval.features import load_run_on_every_rank

    try:
        load_run_on_every_rank(runs[rank], None, torch.device("cpu"))
        return "loaded"
    except UserError as err:
        return str(err)


def test_an_evaluation_whose_ranks_see_different_runs_is_refused_on_every_rank(tiny_run, tmp_path):
    """Each rank loads the run itself: on node-local copies of other weights, features of two checkpoints were
    scored together and recorded as the run's (a top-1 that neither checkpoint scores); where one rank could not
    load it, the others met a broken connection in their next collective (a traceback)."""
    import shutil

    from conftest import copy_run

    runs = [copy_run(tiny_run, tmp_path / "node0"), copy_run(tiny_run, tmp_path / "node1")]
    assert run_distributed(_load_own_copy_of_run, 2, [str(runs[0])] * 2) == ["loaded", "loaded"]
    shutil.copy(runs[1] / "checkpoint_ep0001.pth", runs[1] / "checkpoint.pth")
    errors = run_distributed(_load_own_copy_of_run, 2, [str(run) for run in runs])
    assert errors[0].startswith(f"--run {str(runs[0])!r}: the ranks loaded different weights (digest ")
    assert "on rank(s) 0; digest " in errors[0] and errors[0].endswith(
        "on rank(s) 1): every node must see the same run directory")
    shutil.rmtree(runs[1])
    errors = run_distributed(_load_own_copy_of_run, 2, [str(run) for run in runs])
    assert errors == [f"--run {str(runs[0])!r}: rank(s) 1 cannot load it (--run {str(runs[1])!r} is not a "
                      f"directory): every node must see the same run directory",
                      f"--run {str(runs[1])!r} is not a directory"]
