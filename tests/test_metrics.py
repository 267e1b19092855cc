"""Clustering metrics (eval/metrics.py): Hungarian ACC against brute force, the many-to-one map, sklearn's scores,
and the superclass view on a case computed by hand. Accuracies are compared exactly (they are ratios of counts)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_mutual_info_score, adjusted_rand_score, normalized_mutual_info_score

from clusterlab.eval.metrics import cluster_mapping, cluster_metrics, superclass_metrics
from dist_utils import single_thread  # noqa: F401 - autouse fixture: one intra-op thread


def brute_force_acc(y_true, y_pred, clusters, classes):
    """Best accuracy over every one-to-one map of the clusters into the classes."""
    best = 0
    for image in itertools.permutations(range(classes), clusters):
        best = max(best, int(np.sum(np.asarray(image)[y_pred] == y_true)))
    return best / len(y_true)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_hungarian_acc_equals_brute_force(k):
    rng = np.random.default_rng(k)
    for trial in range(5):
        y_true = rng.integers(0, k, size=60)
        # Partly informative predictions: a hidden permutation of the truth with some noise.
        y_pred = np.where(rng.random(60) < 0.5, rng.permutation(k)[y_true], rng.integers(0, k, size=60))
        got = cluster_metrics(y_true, y_pred, num_clusters=k, num_classes=k)["acc"]
        assert got == brute_force_acc(y_true, y_pred, k, k)


@pytest.mark.parametrize("clusters,classes", [(3, 5), (2, 6)])
def test_fewer_clusters_than_classes_equals_brute_force(clusters, classes):
    rng = np.random.default_rng(10 + clusters)
    y_true, y_pred = rng.integers(0, classes, size=50), rng.integers(0, clusters, size=50)
    mapping, rule = cluster_mapping(y_true, y_pred, clusters, classes)
    assert rule == "hungarian" and len(set(mapping.tolist())) == clusters
    got = cluster_metrics(y_true, y_pred, num_clusters=clusters, num_classes=classes)["acc"]
    assert got == brute_force_acc(y_true, y_pred, clusters, classes)


def test_majority_mapping_when_clusters_exceed_classes():
    """Hand case, 3 clusters and 2 classes. Counts (cluster x class): c0 = [5, 0], c1 = [3, 2], c2 = [1, 0].
    Majority: c0 -> 0, c1 -> 0, c2 -> 0, correct 5 + 3 + 1 = 9 of 11. (A Hungarian match of two clusters, then
    majority for the surplus one, would give c1 -> 1 and 5 + 2 + 1 = 8 of 11: the rules differ here.)"""
    y_pred = np.array([0] * 5 + [1] * 5 + [2])
    y_true = np.array([0] * 5 + [0, 0, 0, 1, 1] + [0])
    mapping, rule = cluster_mapping(y_true, y_pred)
    assert rule == "majority" and mapping.tolist() == [0, 0, 0]
    assert cluster_metrics(y_true, y_pred)["acc"] == 9 / 11


def test_sparse_cluster_ids_are_as_many_clusters_as_they_are():
    """Without counts given, ids 0, 7, 9 are three clusters for three classes (Hungarian), as ids 0, 1, 2 are; the
    largest id made them ten, so the many-to-one rule, and a higher ACC for the same partition."""
    y_true = np.array([0, 0, 0, 0, 1, 2, 2])
    dense = np.array([0, 0, 1, 1, 1, 2, 2])
    sparse = np.array([0, 7, 9])[dense]
    assert cluster_mapping(y_true, sparse)[1] == cluster_mapping(y_true, dense)[1] == "hungarian"
    assert cluster_metrics(y_true, sparse) == cluster_metrics(y_true, dense)
    assert cluster_metrics(y_true, dense)["acc"] == 5 / 7


def test_over_clustering_declared_by_num_clusters():
    """Ten clusters asked for, four classes, only clusters 0..3 used: still the many-to-one rule."""
    y_true = np.array([0, 1, 2, 3, 0, 1])
    y_pred = np.array([1, 1, 2, 3, 0, 0])
    _, rule = cluster_mapping(y_true, y_pred, num_clusters=10, num_classes=4)
    assert rule == "majority"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_ami_ari_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, 4, size=80), rng.integers(0, 6, size=80)
    got = cluster_metrics(y_true, y_pred)
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred), abs=1e-12)
    assert got["ami"] == pytest.approx(adjusted_mutual_info_score(y_true, y_pred), abs=1e-12)
    assert got["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-12)
    assert 0 < got["nmi"] < 1


def test_relabelled_perfect_clustering_scores_one():
    rng = np.random.default_rng(5)
    y_true = rng.integers(0, 7, size=70)
    y_pred = rng.permutation(7)[y_true]
    got = cluster_metrics(y_true, y_pred)
    assert got["acc"] == 1.0
    for key in ("nmi", "ami", "ari"):
        assert got[key] == pytest.approx(1.0, abs=1e-12)


def test_negative_labels_are_refused():
    with pytest.raises(ValueError):
        cluster_metrics([0, 1, -1], [0, 1, 1])


def test_superclass_metrics_hand_case():
    """Fine classes 0, 1 (superclass 0) and 2, 3 (superclass 1); 9 samples.

    Counts (cluster x fine): c0 = [2, 1, 0, 0], c1 = [0, 1, 0, 0], c2 = [0, 0, 1, 0], c3 = [1, 0, 1, 2].
    The Hungarian match (unique optimum, 6 agreements) is c0 -> 0, c1 -> 1, c2 -> 2, c3 -> 3; read as
    superclasses every sample is right except the fine-0 sample in c3 (c3 -> 3 -> superclass 1): ACC 8/9,
    whereas the fine ACC is 6/9. NMI, AMI and ARI compare the clusters with the superclass labels."""
    fine = np.array([0, 0, 1, 1, 2, 2, 3, 3, 0])
    coarse = np.array([0, 0, 0, 0, 1, 1, 1, 1, 0])
    pred = np.array([0, 0, 0, 1, 2, 3, 3, 3, 3])
    assert cluster_metrics(fine, pred)["acc"] == 6 / 9
    got = superclass_metrics(fine, coarse, pred)
    assert got["acc"] == 8 / 9
    assert got["nmi"] == pytest.approx(normalized_mutual_info_score(coarse, pred), abs=1e-12)
    assert got["ami"] == pytest.approx(adjusted_mutual_info_score(coarse, pred), abs=1e-12)
    assert got["ari"] == pytest.approx(adjusted_rand_score(coarse, pred), abs=1e-12)
    # Not the fine labels (the upstream bug this function avoids).
    assert abs(got["nmi"] - normalized_mutual_info_score(fine, pred)) > 0.05


def test_superclass_metrics_with_fewer_clusters_than_fine_classes():
    """Two clusters, four fine classes: c0 -> fine 0 (superclass 0), c1 -> fine 2 (superclass 1); the fine
    classes 1 and 3 stay unmatched but their samples still count through their cluster's matched class."""
    fine = np.array([0, 0, 1, 2, 2, 3, 3, 1])
    coarse = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    got = superclass_metrics(fine, coarse, pred)
    assert got["acc"] == 7 / 8  # only the last sample (superclass 0 in c1 -> superclass 1) is wrong


def test_a_cluster_matched_to_a_fine_class_the_split_lacks_predicts_no_superclass():
    """Four fine classes, 0 and 3 absent from the scored split (num_fine from the dataset); three clusters. The
    Hungarian match gives c0 -> 1, c1 -> 2 and c2 to an absent class: its samples (one of superclass 0, one of 1)
    are wrong whatever their superclass. An absent class read as superclass 0 made the first right: ACC 0.9."""
    fine = np.array([1, 1, 1, 1, 2, 2, 2, 2, 1, 2])
    coarse = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0])
    pred = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    assert superclass_metrics(fine, coarse, pred, num_clusters=3, num_fine=4)["acc"] == 0.8


@pytest.mark.slow  # scikit-learn's KMeans asks a subprocess for the number of physical cores
def test_kmeans_is_fitted_on_the_fit_split_and_only_assigns_the_other():
    """Two tight clusters to fit on, then points of only one of them, spread far along y: assigned, they all fall in
    that cluster; fitted on themselves they would be split in two along y."""
    import torch

    from clusterlab.eval.kmeans import kmeans_assign

    generator = torch.Generator().manual_seed(0)
    fit = torch.cat([torch.randn(50, 2, generator=generator) * 0.1 + torch.tensor([-10.0, 0.0]),
                     torch.randn(50, 2, generator=generator) * 0.1 + torch.tensor([10.0, 0.0])])
    spread = torch.randn(40, 2, generator=generator) * torch.tensor([0.1, 3.0]) + torch.tensor([10.0, 0.0])
    assert len(np.unique(kmeans_assign(fit, spread, 2, restarts=3))) == 1
    assert len(np.unique(kmeans_assign(spread, spread, 2, restarts=3))) == 2


@pytest.mark.slow  # scikit-learn's KMeans asks a subprocess for the number of physical cores
def test_kmeans_fit_size_fits_on_that_many_rows_drawn_with_the_seed():
    """Fitted on as many rows as clusters, the centroids are those rows: every point goes to the nearest of the rows
    that --seed draws without replacement; a fit_size of the whole split is the whole split."""
    import torch

    from clusterlab.eval.kmeans import kmeans_assign

    generator = torch.Generator().manual_seed(3)
    fit, scored = torch.randn(100, 4, generator=generator), torch.randn(60, 4, generator=generator)
    for seed in (0, 5):
        drawn = fit[torch.randperm(100, generator=torch.Generator().manual_seed(seed))[:3]]
        nearest = torch.cdist(scored, drawn).argmin(dim=1).numpy()
        assigned = kmeans_assign(fit, scored, 3, restarts=1, seed=seed, fit_size=3)
        assert adjusted_rand_score(nearest, assigned) == 1.0
    np.testing.assert_array_equal(kmeans_assign(fit, scored, 3, restarts=2, fit_size=100),
                                  kmeans_assign(fit, scored, 3, restarts=2))
