"""Distillation losses on plain tensors. Each returns a scalar: the batch mean as its paper defines it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton's KD: T^2 * mean over the batch of KL(softmax(t/T) || softmax(s/T)).

    s, t: (B, C) student and teacher logits.
    """
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def ce_loss(s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled rows only (label -1 means unlabelled); 0 when none are."""
    labelled = target >= 0
    if not labelled.any():
        return s.sum() * 0.0  # keeps the graph, so every step has the same structure
    return F.cross_entropy(s[labelled], target[labelled])
