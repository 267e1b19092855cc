"""Weighted kNN (eval/knn.py) against a naive per-sample loop; chunking; top-1/top-5; 2 gloo processes vs 1; the
memory-bank monitor on the bank's raw rows.

Class scores: 1e-5 relative to a float64 loop. Accuracies are ratios of counts and are compared exactly.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from clusterlab.data import ImageSet
from clusterlab.eval.knn import knn_accuracy, knn_class_scores, monitor
from clusterlab.data.augment import EvalView
from clusterlab.programs.eval_knn import memory_bank_features
from dist_utils import run_distributed, single_thread  # noqa: F401 - single_thread: autouse fixture

CLASSES = 10


def naive_scores(train, labels, test, num_classes, k, temperature):
    """For each test sample: cosine similarity to every training sample, the k largest, exp(s / T) summed per
    class (NPID's weighted vote, seeds spec 7.2), in plain python."""
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


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (7, 0.1), (20, 0.5), (200, 0.07)])
def test_class_scores_equal_naive_loop(k, temperature):
    train, train_labels, test, _ = make_data()
    got = knn_class_scores(train, train_labels, test, CLASSES, k=k, temperature=temperature)
    expected = naive_scores(train, train_labels, test, CLASSES, min(k, len(train)), temperature)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("max_elements", [1, 60, 61, 7 * 60, 10 ** 9])
def test_chunking_gives_the_same_scores(max_elements):
    """max_elements=1 or 60 (train size): one test sample per chunk; 7 * 60: chunks of 7 with a ragged end."""
    train, train_labels, test, _ = make_data()
    whole = knn_class_scores(train, train_labels, test, CLASSES, k=9)
    chunked = knn_class_scores(train, train_labels, test, CLASSES, k=9, max_elements=max_elements)
    # Different matmul shapes round differently: equal to float32 precision.
    torch.testing.assert_close(chunked, whole, rtol=2e-6, atol=0)


def naive_accuracy(train, train_labels, test, test_labels, k, temperature):
    scores = naive_scores(train, train_labels, test, CLASSES, k, temperature)
    order = scores.argsort(dim=1, descending=True)
    top1 = sum(int(order[i, 0] == test_labels[i]) for i in range(len(test)))
    top5 = sum(int(test_labels[i] in order[i, :5].tolist()) for i in range(len(test)))
    return top1 / len(test), top5 / len(test)


def test_top1_top5_equal_naive():
    train, train_labels, test, test_labels = make_data(seed=1)
    got = knn_accuracy(train, train_labels, test, test_labels, CLASSES, k=15, temperature=0.1)
    top1, top5 = naive_accuracy(train, train_labels, test, test_labels, 15, 0.1)
    assert got == {"top1": top1, "top5": top5}
    assert 0 < got["top1"] < got["top5"] < 1, got


def test_top5_with_fewer_than_five_classes_is_one():
    train, train_labels, test, test_labels = make_data()
    keep = lambda t: t % 3  # noqa: E731 - three classes
    got = knn_accuracy(train, keep(train_labels), test, keep(test_labels), 3, k=5)
    assert got["top5"] == 1.0


def test_perfect_features_give_perfect_accuracy():
    labels = torch.arange(12) % CLASSES
    features = F.one_hot(labels, CLASSES).float()
    got = knn_accuracy(features, labels, features, labels, CLASSES, k=2, temperature=0.1)
    assert got == {"top1": 1.0, "top5": 1.0}


# ---- 2 processes: each scores its share of the test set -------------------------------------------------------------

N_TESTS = (23, 1)  # 23 test samples (shares 12 and 11) and 1 (one rank has nothing to score)


def _knn_worker(rank, world, datasets):
    return [knn_accuracy(*data, CLASSES, k=15, temperature=0.1) for data in datasets]


def test_two_processes_equal_one_process():
    datasets = [make_data(n_test=n, seed=2) for n in N_TESTS]
    results = run_distributed(_knn_worker, 2, datasets)
    for index, data in enumerate(datasets):
        one = knn_accuracy(*data, CLASSES, k=15, temperature=0.1)
        assert results[0][index] == results[1][index] == one
    assert 0 < results[0][0]["top1"] < 1


# ---- the memory-bank monitor ----------------------------------------------------------------------------------------

class BankMethod(torch.nn.Module):
    """What the monitor reads of a memory-bank method: the bank, and one fixed test embedding for every image."""

    eval_view, monitor_temperature = EvalView.of(8), 0.1

    def __init__(self, bank: torch.Tensor, query: torch.Tensor):
        super().__init__()
        self.memory_bank, self.query = bank, query
        self.info = SimpleNamespace(mean=(0.5,), std=(0.25,))

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        return self.query.expand(len(images), -1)


def grey_images(labels: list[int]) -> ImageSet:
    return ImageSet("fake", "train", torch.tensor(labels), 2, 1, 8, (0.5,), (0.25,), ["a", "b"],
                    images=torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8))


def test_memory_bank_monitor_and_eval_knn_read_the_raw_rows():
    """Upstream's kNN monitor (and eval_knn.py --train_features memory_bank) use the bank rows as they are. Row 0
    (class 0) was never updated and is 5 units long at cosine 0.6 to the query, row 1 (class 1) is unit-length at
    cosine 0.9: the dot product (3 against 0.9) makes row 0 the nearest neighbour, the cosine would pick row 1."""
    bank = torch.tensor([[3.0, 4.0], [0.9, 0.19 ** 0.5]])
    method = BankMethod(bank, torch.tensor([[1.0, 0.0]]))
    train, test = grey_images([0, 1]), grey_images([0])
    raw = monitor(method, train, test, k=1, source="memory_bank", device=torch.device("cpu"))
    assert raw["top1"] == 1.0
    normalised = knn_accuracy(F.normalize(bank, dim=1), train.labels, method.query, test.labels, 2, k=1)
    assert normalised["top1"] == 0.0
    loaded = SimpleNamespace(method=method, args=SimpleNamespace(method="npid", train_split="train"))
    assert torch.equal(memory_bank_features(loaded, 2), bank)
