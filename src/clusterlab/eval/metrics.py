"""Clustering metrics: Hungarian accuracy, many-to-one accuracy for over-clustering, NMI, AMI, ARI.

Conventions: ACC matches clusters to classes one-to-one maximising agreements (scipy's linear_sum_assignment on
the count matrix, as EmbedUL/EmbedUL@4027eab lib/protocols.py and elad-amrani/self-classifier@3935138
src/cls_eval.py do); with more clusters than classes each cluster is mapped to its majority class instead
(many-to-one; Self-Classifier maps only the surplus clusters that way). NMI (arithmetic normalisation), AMI and ARI
are scikit-learn's, as Self-Classifier's.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score


def count_matrix(y_pred: np.ndarray, y_true: np.ndarray, num_clusters: int, num_classes: int) -> np.ndarray:
    """counts[k, c] = number of samples in cluster k whose class is c."""
    return np.bincount(y_pred * num_classes + y_true, minlength=num_clusters * num_classes).reshape(
        num_clusters, num_classes)


def hungarian_mapping(counts: np.ndarray) -> np.ndarray:
    """Cluster -> class, one-to-one where possible, maximising the matched counts; unmatched clusters get -1."""
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = np.full(counts.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def majority_mapping(counts: np.ndarray) -> np.ndarray:
    """Cluster -> its most frequent class (many-to-one)."""
    return counts.argmax(axis=1)


def _as_labels(values) -> np.ndarray:
    array = np.asarray(values).astype(np.int64).ravel()
    if array.size and array.min() < 0:
        raise ValueError("labels and cluster ids must be non-negative integers")
    return array


def cluster_mapping(y_true, y_pred, num_clusters: int | None = None, num_classes: int | None = None
                    ) -> tuple[np.ndarray, str]:
    """The cluster -> class map the ACC uses (indexed by cluster id), and its name: hungarian, or majority when
    there are more clusters than classes. Counts not given are those of the ids that occur: ids 0, 7 and 9 are three
    clusters, not ten."""
    y_true, y_pred = _as_labels(y_true), _as_labels(y_pred)
    clusters = num_clusters or len(np.unique(y_pred))
    classes = num_classes or len(np.unique(y_true))
    counts = count_matrix(y_pred, y_true, max(num_clusters or 0, int(y_pred.max()) + 1),
                          max(num_classes or 0, int(y_true.max()) + 1))
    if clusters > classes:
        return majority_mapping(counts), "majority"
    return hungarian_mapping(counts), "hungarian"


def cluster_metrics(y_true, y_pred, num_clusters: int | None = None, num_classes: int | None = None) -> dict:
    """ACC, NMI, AMI and ARI of cluster ids `y_pred` against classes `y_true`."""
    y_true, y_pred = _as_labels(y_true), _as_labels(y_pred)
    mapping, _ = cluster_mapping(y_true, y_pred, num_clusters, num_classes)
    acc = float(np.mean(mapping[y_pred] == y_true))
    return {"acc": acc, "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
            "ami": float(adjusted_mutual_info_score(y_true, y_pred)),
            "ari": float(adjusted_rand_score(y_true, y_pred))}


def superclass_metrics(y_true_fine, y_true_coarse, y_pred, num_clusters: int | None = None,
                       num_fine: int | None = None) -> dict:
    """Superclass view: clusters matched to fine classes first, then both sides read as superclasses.

    ACC counts a sample as right when its cluster's matched fine class has the sample's superclass (as
    Self-Classifier's superclass evaluation); NMI, AMI and ARI compare clusters with the superclass labels
    themselves (upstream compares them with the fine labels, a bug).
    """
    fine, coarse, y_pred = _as_labels(y_true_fine), _as_labels(y_true_coarse), _as_labels(y_pred)
    num_fine = max(num_fine or 0, int(fine.max()) + 1)
    # -1 for a fine class the scored split lacks: a cluster matched to it predicts no superclass (it gave superclass
    # 0 to its samples, right for those of superclass 0)
    fine_to_coarse = np.full(num_fine, -1, dtype=np.int64)
    fine_to_coarse[fine] = coarse
    mapping, _ = cluster_mapping(fine, y_pred, num_clusters, num_fine)
    matched = mapping[y_pred]
    predicted_coarse = np.where(matched >= 0, fine_to_coarse[np.maximum(matched, 0)], -1)
    return {"acc": float(np.mean(predicted_coarse == coarse)),
            "nmi": float(normalized_mutual_info_score(coarse, y_pred)),
            "ami": float(adjusted_mutual_info_score(coarse, y_pred)),
            "ari": float(adjusted_rand_score(coarse, y_pred))}
