"""Weighted k-nearest-neighbour classification (Wu, Xiong, Yu and Lin, "Unsupervised Feature Learning via
Non-Parametric Instance Discrimination", CVPR 2018, sec. 3.5; zhirongw/lemniscate.pytorch@f7cfe29 test.py `kNN`,
which Super-AND's code copies).

With L2-normalised features, the k training samples most similar (cosine) to a test sample vote for their class
with weight exp(s / T); the prediction ranks classes by their summed weight. The neighbours come from
ops/knn.topk_neighbours (chunked so that at most `max_elements` similarities are held at once; equal similarities
ordered by training index).
"""
from __future__ import annotations

import torch

from ..ops.knn import topk_neighbours


@torch.no_grad()
def knn_class_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                     num_classes: int, k: int = 200, temperature: float = 0.1, max_elements: int = 2 ** 24,
                     split_over_ranks: bool = False) -> torch.Tensor:
    """(N_test, num_classes) summed vote weights. Features are L2-normalised, except a memory bank's rows that no
    step has updated yet: like upstream's monitor, the similarity is then the plain dot product with the raw row.
    `split_over_ranks`: collective, each rank searches a share of the test set and every rank gets all scores."""
    k = min(k, train_features.shape[0])
    if test_features.shape[0] == 0 or k == 0:
        return torch.zeros(test_features.shape[0], num_classes, device=test_features.device)
    found = topk_neighbours(test_features, train_features, k, chunk_elements=max_elements,
                            split_over_ranks=split_over_ranks)
    weights = torch.exp(found.similarities / temperature)
    votes = torch.zeros(weights.shape[0], num_classes, device=weights.device, dtype=weights.dtype)
    return votes.scatter_add_(1, train_labels.to(weights.device)[found.indices], weights)


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int, k: int = 200,
                 temperature: float = 0.1) -> dict:
    """Top-1 and top-5 accuracy; collective: the ranks share the neighbour search and all return the same."""
    scores = knn_class_scores(train_features, train_labels, test_features, num_classes, k, temperature,
                              split_over_ranks=True)
    top = scores.topk(min(5, num_classes), dim=1).indices
    truth = test_labels.to(top.device)
    counts = torch.tensor([(top[:, 0] == truth).sum().item(), (top == truth[:, None]).any(1).sum().item(),
                           len(truth)], dtype=torch.float64)
    return {"top1": float(counts[0] / counts[2]), "top5": float(counts[1] / counts[2])}


@torch.no_grad()
def monitor(method, train_set, test_set, k: int, source: str, device: torch.device) -> dict:
    """The per-epoch kNN monitor of NPID-style training: test embeddings against the memory bank's raw rows
    (upstream's monitor, `source` memory_bank) or against train embeddings recomputed with the test view
    (`recomputed`)."""
    from .features import extract

    was_training = method.training
    method.eval()
    view, info = method.eval_view, method.info
    test_x = extract(method.embedding, test_set, view, info.mean, info.std, device)
    if source == "memory_bank":
        train_x = method.memory_bank[: len(train_set)].float()
    else:
        train_x = extract(method.embedding, train_set, view, info.mean, info.std, device)
    method.train(was_training)
    labelled = train_set.labels >= 0  # the unlabelled part of STL-10's train+unlabeled votes for nothing
    return knn_accuracy(train_x[labelled.to(train_x.device)], train_set.labels[labelled].to(device), test_x,
                        test_set.labels, test_set.num_classes, k, method.monitor_temperature)
