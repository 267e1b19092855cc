"""Weighted k-nearest-neighbour classification (Wu, Xiong, Yu and Lin, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", CVPR 2018, sec. 3.5; zhirongw/lemniscate.pytorch@f7cfe29 test.py `kNN`,
which Super-AND's code copies).

With L2-normalised features, the k training samples most similar (cosine) to a test sample vote for their class
with weight exp(s / T); the prediction ranks classes by their summed weight. The neighbours come from
ops/knn.topk_neighbours (chunked so that at most `max_elements` similarities are held at once; equal similarities
ordered by training index).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..checkpoint import non_finite_rows
from ..models import training_mode
from ..ops import CHUNK_ELEMENTS
from ..ops.knn import Neighbours, topk_neighbours


@torch.no_grad()
def knn_class_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                     num_classes: int, k: int = 200, temperature: float = 0.1, max_elements: int = CHUNK_ELEMENTS,
                     split_over_ranks: bool = False) -> torch.Tensor:
    """(N_test, num_classes) summed vote weights, each row divided by exp(s_1 / T) of its nearest neighbour (see
    `class_votes`). Features are L2-normalised, except a memory bank's rows that no step has updated yet: like
    upstream's monitor, the similarity is then the plain dot product with the raw row.
    `split_over_ranks`: collective, each rank searches a share of the test set and every rank gets all scores."""
    found = nearest_train_samples(train_features, test_features, k, max_elements, split_over_ranks)
    return class_votes(found, train_labels, num_classes, k, temperature)


def nearest_train_samples(train_features, test_features, k: int, max_elements: int = CHUNK_ELEMENTS,
                          split_over_ranks: bool = False) -> Neighbours:
    """The min(k, N_train) nearest train samples of every test sample, most similar first (none if either set is
    empty)."""
    k = min(k, train_features.shape[0])
    if test_features.shape[0] == 0 or k == 0:
        return Neighbours(test_features.new_zeros(test_features.shape[0], 0),
                          torch.zeros(test_features.shape[0], 0, dtype=torch.long, device=test_features.device))
    return topk_neighbours(test_features, train_features, k, chunk_elements=max_elements,
                           split_over_ranks=split_over_ranks)


def class_votes(found: Neighbours, train_labels: torch.Tensor, num_classes: int, k: int,
                temperature: float) -> torch.Tensor:
    """(N_test, num_classes): the first k of `found` vote for their class with weight exp(s / T), divided by the
    nearest neighbour's exp(s_1 / T). One factor per row leaves its ranking as upstream's, and keeps the weights
    finite: exp(s / T) itself passes float32's range once s / T > 88 (cosine 0.9 at T = 0.01), and votes of inf tie.
    Ties are ordered by index (ops/knn), so the first k of a wider search are exactly the k nearest."""
    return class_log_votes(found, train_labels, num_classes, k, temperature).exp()


def class_log_votes(found: Neighbours, train_labels: torch.Tensor, num_classes: int, k: int,
                    temperature: float) -> torch.Tensor:
    """The logarithm of `class_votes`, computed as a log-sum-exp per class: -inf exactly for a class no neighbour
    voted for. Summed as plain weights, a class whose neighbours are far below the nearest ((s - s_1) / T < -103:
    a cosine gap of 1.04 at T = 0.01) got a vote of 0 and tied with the classes nobody voted for, so top-5 lost it."""
    similarities = found.similarities[:, :k]
    logits = (similarities - similarities[:, :1]) / temperature
    classes = train_labels.to(logits.device)[found.indices[:, :k]]
    largest = logits.new_full((logits.shape[0], num_classes), -math.inf).scatter_reduce(1, classes, logits, "amax")
    sums = torch.zeros_like(largest).scatter_add_(1, classes, torch.exp(logits - largest.gather(1, classes)))
    return largest + sums.log()


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int, k: int = 200,
                 temperature: float = 0.1) -> dict:
    """Top-1 and top-5 accuracy; collective: the ranks share the neighbour search and all return the same."""
    return knn_accuracies(train_features, train_labels, test_features, test_labels, num_classes, [k],
                          temperature)[k]


@torch.no_grad()
def knn_accuracies(train_features, train_labels, test_features, test_labels, num_classes: int,
                   ks: Sequence[int], temperature: float = 0.1) -> dict[int, dict]:
    """{k: top-1 and top-5 accuracy} for every k in `ks` from one neighbour search, the widest; collective as
    `knn_accuracy`, whose result it equals for each k. A top-5 hit needs a vote for the true class: where fewer than
    five classes are voted for, the rest of a top-5 list are classes nobody voted for (upstream's score 0, our
    -inf) in tie order, which upstream counts (so that its top-5 depends on how the classes are numbered)."""
    found = nearest_train_samples(train_features, test_features, max(ks), split_over_ranks=True)
    truth = test_labels.to(found.indices.device)
    accuracies = {}
    for k in ks:
        scores = class_log_votes(found, train_labels, num_classes, k, temperature)
        top = scores.topk(min(5, num_classes), dim=1).indices
        voted = scores.gather(1, truth[:, None]).squeeze(1) > -math.inf
        counts = torch.tensor([(top[:, 0] == truth).sum().item(),
                               ((top == truth[:, None]).any(1) & voted).sum().item(), len(truth)], dtype=torch.float64)
        accuracies[k] = {"top1": float(counts[0] / counts[2]), "top5": float(counts[1] / counts[2])}
    return accuracies


@torch.no_grad()
def monitor(method, train_set, test_set, k: int, source: str, device: torch.device, workers: int = 0) -> dict:
    """The per-epoch kNN monitor of NPID-style training: test embeddings against the memory bank's raw rows that a
    step has written (upstream's monitor, `source` memory_bank) or against train embeddings recomputed with the test
    view (`recomputed`). `workers` loader processes decode image files (none for in-memory sets). Returns top1, top5
    and how many training images voted (`voters`); or, where some embeddings are not finite (weights that overflow
    on real images, though not on the trainer's probe of noise), only how many (`non_finite`), the same on every
    rank (the features are gathered)."""
    from .features import extract

    view, info = method.eval_view, method.info
    labelled = train_set.labels >= 0  # the unlabelled part of STL-10's train+unlabeled votes for nothing
    with training_mode(method, False):
        test_x = extract(method.embedding, test_set, view, info.mean, info.std, device, workers=workers)
        if source == "memory_bank":
            train_x = method.memory_bank[: len(train_set)].float()
            labelled &= method.memory_bank_written[: len(train_set)].cpu()  # a row never written holds no embedding
        else:
            train_x = extract(method.embedding, train_set, view, info.mean, info.std, device, workers=workers)
    train_x = train_x[labelled.to(train_x.device)]
    non_finite = non_finite_rows(test_x) + non_finite_rows(train_x)
    if non_finite:
        return {"non_finite": non_finite}
    scores = knn_accuracy(train_x, train_set.labels[labelled].to(device), test_x, test_set.labels,
                          test_set.num_classes, k, method.monitor_temperature)
    return {**scores, "voters": int(labelled.sum())}
