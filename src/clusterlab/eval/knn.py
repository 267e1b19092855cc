"""Weighted k-nearest-neighbour classification (Wu et al., "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", CVPR 2018, sec. 3.5; seeds spec 7.2).

With L2-normalised features, the k training samples most similar (cosine) to a test sample vote for their class
with weight exp(s / T); the prediction ranks classes by their summed weight. Computed in chunks of test samples so
that the similarity matrix held at once stays under `max_elements` entries.
"""
from __future__ import annotations

import torch

from .. import distributed


@torch.no_grad()
def knn_class_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                     num_classes: int, k: int = 200, temperature: float = 0.1, max_elements: int = 2 ** 24
                     ) -> torch.Tensor:
    """(N_test, num_classes) summed vote weights. Features are L2-normalised, except a memory bank's rows that no
    step has updated yet: like upstream's monitor, the similarity is then the plain dot product with the raw row."""
    k = min(k, train_features.shape[0])
    chunk = max(1, max_elements // max(1, train_features.shape[0]))
    scores = []
    for start in range(0, test_features.shape[0], chunk):
        similarity = test_features[start: start + chunk] @ train_features.t()
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = torch.exp(top_sim / temperature)
        votes = torch.zeros(similarity.shape[0], num_classes, device=similarity.device, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int, k: int = 200,
                 temperature: float = 0.1) -> dict:
    """Top-1 and top-5 accuracy; with several ranks each scores its share of the test set."""
    share = distributed.shard_range(test_features.shape[0])
    scores = knn_class_scores(train_features, train_labels, test_features[share.start: share.stop], num_classes,
                              k, temperature)
    top = scores.topk(min(5, num_classes), dim=1).indices
    truth = test_labels[share.start: share.stop].to(top.device)
    counts = torch.tensor([(top[:, 0] == truth).sum().item(), (top == truth[:, None]).any(1).sum().item(),
                           len(truth)], dtype=torch.float64, device=top.device)
    distributed.all_reduce_sum(counts)
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
