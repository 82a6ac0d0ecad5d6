"""Reductions over a teacher's cache: class means and feature moments, with no teacher run.

KD++ needs the teacher's class means; feature mean and covariance are there
for methods that whiten or compare feature spaces. They are computed from
the stored features of every committed view, so they describe exactly the
views a student is trained on.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from storage import Store, UserError

from ..progress import Progress

log = logging.getLogger(__name__)


def compute_stats(store: Store, teacher_id: str, labels: np.ndarray) -> dict:
    """Per-class means, feature mean and covariance of ``teacher_id``'s stored features (float64 sums)."""
    info = store.teacher_info(teacher_id)
    if "features" not in info.outputs:
        raise UserError(
            f"teacher '{teacher_id}' has no stored features: extract with --outputs features to compute statistics"
        )
    group, units = store.teacher(teacher_id), store.units(info.views)
    missing = set(units) - group.committed()
    if missing:
        raise UserError(f"teacher '{teacher_id}' is missing {len(missing)} units: finish `pipeline extract` first")
    C, D = int(labels.max()) + 1, info.feature_dim
    sums, counts = np.zeros((C, D)), np.zeros(C, np.int64)
    total, outer, n = np.zeros(D), np.zeros((D, D)), 0
    progress = Progress(f"stats {teacher_id}", info.views * store.num_samples)
    for v, b in units:
        ids = store.block_ids(b)  # the block's samples, at its rows
        f = group.read_unit(v, b, ["features"], rows=len(ids), verify=True)["features"].astype(np.float64)  # (n, D)
        np.add.at(sums, labels[ids], f)
        counts += np.bincount(labels[ids], minlength=C)
        total += f.sum(0)
        outer += f.T @ f
        n += len(ids)
        progress.update(len(ids))
    mean = total / n
    return {
        "class_means": (sums / np.maximum(counts, 1)[:, None]).astype(np.float32),
        "class_counts": counts,
        "feature_mean": mean.astype(np.float32),
        "feature_cov": (outer / n - np.outer(mean, mean)).astype(np.float32),
    }


def write_stats(store: Store, teacher_id: str, labels: np.ndarray) -> dict:
    arrays = compute_stats(store, teacher_id, labels)
    store.write_stats(teacher_id, arrays, {"views": store.teacher_info(teacher_id).views, "samples": store.num_samples})
    return arrays


def class_means(store: Store, teacher_id: str) -> torch.Tensor | None:
    means = store.read_stats(teacher_id, "class_means")
    return None if means is None else torch.from_numpy(means)
