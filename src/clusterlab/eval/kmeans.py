"""k-means with k-means++ seeding and several restarts (scikit-learn), fitted on one split, applied to another."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans


def kmeans_assign(fit_features: torch.Tensor, eval_features: torch.Tensor, clusters: int, restarts: int = 10,
                  seed: int = 0, fit_size: int | None = None) -> np.ndarray:
    """Cluster ids of `eval_features` under the k-means fitted on `fit_features`, or on `fit_size` of its rows drawn
    without replacement with `seed`."""
    model = KMeans(n_clusters=clusters, n_init=restarts, init="k-means++", random_state=seed)
    if fit_size is not None and fit_size < len(fit_features):
        rows = torch.randperm(len(fit_features), generator=torch.Generator().manual_seed(seed))[:fit_size]
        fit_features = fit_features.cpu()[rows.sort().values]
    model.fit(fit_features.cpu().double().numpy())
    return model.predict(eval_features.cpu().double().numpy())
