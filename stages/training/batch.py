"""A batch of replayed views as a training step takes it (``Batch``), and its targets: hard labels and mixed,
smoothed target rows (``targets``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.replay import Table
from ..data.views import mixed_targets
from ..methods import Targets


def targets(labels: np.ndarray, num_classes: int, smoothing: float, partner_labels=None, lam=None) -> Targets:
    """Hard labels and their (mixed, smoothed) target rows; label -1 (unlabelled) gives a zero row.

    ``partner_labels`` and ``lam`` describe mixed views (-1 / 1.0 where a view is not mixed).
    """
    n = len(labels)
    partner_labels = np.full(n, -1) if partner_labels is None else partner_labels
    lam = np.ones(n) if lam is None else lam
    soft, labelled = mixed_targets(labels, partner_labels, lam, num_classes, smoothing)
    return Targets(torch.where(labelled, torch.from_numpy(np.asarray(labels)).long(), -1), soft)


@dataclass
class Batch:
    """One batch of replayed views, ready for a student step.

    Attributes:
        images: (B, 3, S, S) uint8 views at the student's size, or float32 when the loader normalises.
        targets: ``labels`` (B,) int64 (-1 where the label may not be used) and ``soft`` (B, C) float32
            mixed and smoothed target rows, weighted by each view's own mixing share.
        teachers: per teacher id, its outputs for these views: ``logits`` (B, C), ``features`` (B, D),
            ``tokens`` (B, T, D), float32 (only those the loader was asked for).
        ids: (B,) int64 sample ids; views: (B,) int64 the stored view each row replays.
        lam: (B,) float64 share of each row's own image in its view (1 where it does not mix).
        teacher_images: (B, 3, T, T) uint8 views at a live teacher's size, when one was asked for.
        rows: the batch's table (numpy columns: view parameters, stored rows), for code that reads more.
    """

    images: torch.Tensor
    targets: Targets
    teachers: dict[str, dict[str, torch.Tensor]]
    ids: torch.Tensor
    views: torch.Tensor
    lam: torch.Tensor
    teacher_images: torch.Tensor | None = None
    rows: Table = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device, non_blocking: bool = False) -> Batch:
        """This batch with every tensor on ``device`` (pinned first for a CUDA device, so ``non_blocking`` overlaps the copy).

        Example:
            >>> batch = batch.to("cuda", non_blocking=True)
        """
        pin = torch.device(device).type == "cuda"

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            return (t.pin_memory() if pin and t.device.type == "cpu" else t).to(device, non_blocking=non_blocking)

        return dataclasses.replace(
            self,
            images=move(self.images),
            targets=Targets(move(self.targets.labels), move(self.targets.soft)),
            teachers={tid: {k: move(v) for k, v in out.items()} for tid, out in self.teachers.items()},
            ids=move(self.ids),
            views=move(self.views),
            lam=move(self.lam),
            teacher_images=move(self.teacher_images),
        )
