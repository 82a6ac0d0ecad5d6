"""Measures of what a cache keeps, against the full teacher outputs: for benchmarks/store.py and the tests, not the product.

Imported as ``fidelity`` by the benchmark scripts (run from benchmarks/) and as ``benchmarks.fidelity`` by the tests.
"""

from __future__ import annotations

import numpy as np
import torch


def gradient_cosine(loss, student: torch.Tensor, full: torch.Tensor, other: torch.Tensor) -> float:
    """Cosine between d loss(student, full) / d student and d loss(student, other) / d student, over the whole batch.

    ``loss(student_logits, teacher_logits)``: a scalar loss, e.g. ``lambda s, t: kd_loss(s, t, 4.0)``.
    """
    grads = []
    for teacher in (full, other):
        s = student.detach().double().requires_grad_(True)
        (g,) = torch.autograd.grad(loss(s, teacher.detach().double()), s)
        grads.append(g.flatten())
    a, b = grads
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def old_tail_clamped(logits: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) whether the encoding before store format 2 (float16 top-k logits, ``1 - sum`` tail) clamped the row's tail."""
    values = logits.float().topk(k, dim=1).values.half().float()
    lse = torch.logsumexp(logits.float(), dim=1, keepdim=True)
    return (1.0 - torch.exp(values - lse).sum(1)) <= 0


def cosine_fidelity(a, b) -> dict[str, float]:
    """Mean and minimum cosine between matching rows (last axis) of ``a`` and ``b``, e.g. float32 vs dequantised."""
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64).reshape(-1, np.shape(a)[-1])
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64).reshape(-1, np.shape(b)[-1])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)
    return {"mean": float(cos.mean()), "min": float(cos.min())}
