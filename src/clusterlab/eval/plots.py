"""Figures a person looks at: the confusion matrix of clusters against classes, sample grids per cluster."""
from __future__ import annotations

import io
import textwrap
from pathlib import Path

import numpy as np
import torch

from ..errors import printable
from .metrics import cluster_mapping, count_matrix


# A person reads labels and counts on a matrix of up to about a hundred rows; ImageNet's 1000 classes by 2000 clusters
# at the readable cell size made a 700 x 350 inch figure that Agg cannot draw (more than 2**16 pixels a side).
LABELLED_CELLS = 100
MAX_INCHES = 30.0
# A sample grid's cell is 0.8 inch at 100 dpi, 80 pixels: image files are decoded for it at about that size (a JPEG
# by a reduced decode), not at the set's nominal size (a hundred photos of 2,000 px took minutes and gigabytes).
THUMBNAIL_PX = 96


def confusion_png(y_true, y_pred, num_clusters: int, class_names, path: str | Path, title: str) -> None:
    """Rows: true classes; columns: the `num_clusters` clusters (ids below it), ordered by the class they are mapped
    to, by the map the ACC of that many clusters uses. Above LABELLED_CELLS rows or columns, the cells shrink to fit
    MAX_INCHES and that side loses its tick labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    num_classes = max(len(class_names), int(y_true.max()) + 1)
    mapping, _ = cluster_mapping(y_true, y_pred, num_clusters, num_classes)
    counts = count_matrix(y_pred, y_true, len(mapping), num_classes).T
    order = np.argsort(np.where(mapping >= 0, mapping, num_classes), kind="stable")
    counts = counts[:, order]
    rows, columns = counts.shape
    cell = min(0.35, MAX_INCHES / max(rows, columns))
    width = max(4.0, cell * columns + 2)
    figure, axes = plt.subplots(figsize=(width, max(3.0, cell * rows + 1.5)))
    axes.imshow(counts / np.maximum(counts.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1,
                interpolation="nearest", aspect="auto")
    axes.set_xlabel("cluster (ordered by matched class)")
    axes.set_ylabel("true class")
    if rows <= LABELLED_CELLS:
        axes.set_yticks(range(rows))
        axes.set_yticklabels([printable(str(n))[:18] for n in list(class_names)[:rows]], fontsize=7)
    if columns <= LABELLED_CELLS:
        axes.set_xticks(range(columns))
        axes.set_xticklabels([str(c) for c in order], fontsize=6, rotation=90)
    if counts.size <= 400:
        for (row, col), value in np.ndenumerate(counts):
            if value:
                axes.text(col, row, str(value), ha="center", va="center", fontsize=6)
    # wrapped to the figure's width (some 12 characters an inch at this size): a narrow plot cut the ACC off its end
    axes.set_title(textwrap.fill(title, width=int(12 * width)), fontsize=9)
    figure.tight_layout()
    save_png(figure, path, dpi=120)


def cluster_samples_png(images, y_pred, path: str | Path, title: str, clusters: int = 20, per_cluster: int = 10,
                        seed: int = 0) -> None:
    """A row of sample images for each of the `clusters` largest predicted clusters, so a person can see them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y_pred = np.asarray(y_pred)
    ids, counts = np.unique(y_pred, return_counts=True)
    shown = ids[np.argsort(-counts, kind="stable")][:clusters]
    rng = np.random.default_rng(seed)
    figure, axes = plt.subplots(len(shown), per_cluster, figsize=(per_cluster * 0.8, len(shown) * 0.8 + 0.4),
                                squeeze=False)
    members = [np.flatnonzero(y_pred == cluster) for cluster in shown]
    picked = [rng.choice(m, size=min(per_cluster, len(m)), replace=False) for m in members]
    pictures = iter(_images(images, np.concatenate(picked).astype(np.int64)))
    for row, (cluster, chosen) in enumerate(zip(shown, picked)):
        for col in range(per_cluster):
            axis = axes[row, col]
            axis.axis("off")
            if col < len(chosen):
                image = next(pictures)
                axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        axes[row, 0].set_title(f"{cluster} (n={len(members[row])})", fontsize=6, loc="left")
    figure.suptitle(title, fontsize=8)
    figure.tight_layout()
    save_png(figure, path, dpi=100)


def save_png(figure, path: str | Path, dpi: int) -> None:
    """Write `figure` to `path` as a PNG, atomically (a job killed meanwhile, or a person opening the file, never
    meets half an image; an older figure of that name stays whole until the new one replaces it; a link there is
    replaced, not the file it names), and close it."""
    import matplotlib.pyplot as plt

    from ..checkpoint import atomic_write_bytes

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue(), through_links=False)


def _images(images, indices: np.ndarray) -> list[np.ndarray]:
    """The images `indices` as uint8 HxW (grey) or HxWx3, read in one pass (image files: the centre square, at the
    set's nominal size or THUMBNAIL_PX, the smaller)."""
    from ..data.augment import EvalView
    from ..data.loader import sequential

    view = EvalView.of(min(images.image_size, THUMBNAIL_PX))
    batches = sequential(images, torch.from_numpy(indices), 256, view=view)
    arrays = [array for batch, _ in batches for array in batch.numpy()]
    return [array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0) for array in arrays]
