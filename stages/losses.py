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


def _kl_from_log_probs(log_p_t: torch.Tensor, log_p_s: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim of KL(p_t || p_s), from log-probabilities (B, K) -> (B,).

    Both sides stay in log space, so a probability that underflows to 0 contributes exactly 0
    (exp(log_p_t) = 0 times a finite difference) instead of 0 * -inf = nan; a teacher class
    with log-probability -inf (a masked logit) contributes 0 too, as 0 log 0 = 0 by convention.
    """
    terms = log_p_t.exp() * (log_p_t - log_p_s)  # (B, K)
    return torch.where(torch.isneginf(log_p_t), 0.0, terms).sum(dim=1)


def _binary_log_probs(z: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """log of (p_target, 1 - p_target) under softmax(z), computed without forming 1 - p: (B, C) -> (B, 2)."""
    lse_all = torch.logsumexp(z, dim=1)  # (B,)
    log_p_target = z.masked_fill(~target_mask, 0.0).sum(dim=1) - lse_all  # (B,): the target logit minus log Z
    # The non-target mass as its own log-sum-exp: exact even when p_target rounds to 1.
    log_p_other = torch.logsumexp(z.masked_fill(target_mask, float("-inf")), dim=1) - lse_all  # (B,)
    return torch.stack([log_p_target, log_p_other], dim=1)


def dkd_loss(
    s: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 2.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Decoupled Knowledge Distillation (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022).

    With p = softmax(z/T), b = (p_y, 1 - p_y) the binary target/non-target split and p̂ the
    softmax over the non-target classes only (the target class removed):
        TCKD = KL(b_t || b_s),  NCKD = KL(p̂_t || p̂_s),
        loss = T^2 * mean over the batch of (alpha * TCKD + beta * NCKD).

    s, t: (B, C) student and teacher logits, C >= 2; target: (B,) class indices.
    The official code (megvii-research/mdistiller) subtracts 1000 from the target logit before the
    non-target softmax and takes log of the binary probabilities; here the target column is
    removed exactly and everything stays in log space, which agrees to float precision and stays
    finite for saturated softmaxes.
    """
    B, C = s.shape
    target_mask = F.one_hot(target.long(), C).bool()  # (B, C)
    zs, zt = s / temperature, t / temperature

    tckd = _kl_from_log_probs(_binary_log_probs(zt, target_mask), _binary_log_probs(zs, target_mask))  # (B,)

    other = ~target_mask
    zs_other = zs[other].view(B, C - 1)  # (B, C-1): each row keeps its C-1 non-target logits, in order
    zt_other = zt[other].view(B, C - 1)
    nckd = _kl_from_log_probs(F.log_softmax(zt_other, dim=1), F.log_softmax(zs_other, dim=1))  # (B,)

    return (alpha * tckd.mean() + beta * nckd.mean()) * temperature**2


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b: (N, K) -> (N,).

    As in the official DIST code: the cosine of the centred rows with eps added to the product of
    norms, so a constant row (zero variance) gives correlation 0 rather than nan.
    """
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_loss(s: torch.Tensor, t: torch.Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

    With p = softmax(z/tau) as (B, C) matrices:
        inter = 1 - mean over samples of Pearson(p_s[i, :], p_t[i, :])   (relation across classes)
        intra = 1 - mean over classes of Pearson(p_s[:, c], p_t[:, c])   (relation across the batch)
        loss = tau^2 * (beta * inter + gamma * intra)

    s, t: (B, C) student and teacher logits. Pearson uses eps = 1e-8 on the norm product as the
    official hunto/DIST_KD code does, so a row or column with no variance (e.g. B = 1 for intra)
    counts as correlation 0.
    """
    p_s = F.softmax(s / tau, dim=1)  # (B, C)
    p_t = F.softmax(t / tau, dim=1)
    inter = 1 - _pearson_rows(p_s, p_t).mean()
    intra = 1 - _pearson_rows(p_s.T, p_t.T).mean()  # (C, B): one correlation per class
    return tau**2 * (beta * inter + gamma * intra)


def nd_loss(s_emb: torch.Tensor, t_norm: torch.Tensor, class_means: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KD++'s norm-and-direction loss (Wang et al., "Improving Knowledge Distillation via
    Regularizing Feature Norm and Direction").

        L_nd = mean over i of 1 - <s_i, e_{y_i}> / max(||s_i||, ||t_i||)

    with e_y the teacher's mean embedding of class y scaled to unit length: the student is pulled
    towards the class-mean direction and towards a norm at least as large as the teacher's.

    s_emb: (B, D) student embeddings (already projected to the teacher's D); t_norm: (B,) the norm
    of the teacher embedding of the same view; class_means: (C, D) teacher class means (normalised
    here); target: (B,) class indices. As in the official code (WangYZ1608/Knowledge-Distillation-via-ND,
    ``DirectNormLoss``) the larger norm is chosen per sample, the student's on a tie, and the
    gradient flows through whichever norm is chosen.
    """
    e = F.normalize(class_means.to(s_emb), dim=1)[target.long()]  # (B, D) unit class-mean directions
    s_norm = s_emb.norm(dim=1)  # (B,)
    t_norm = t_norm.to(s_norm)
    max_norm = torch.where(s_norm >= t_norm, s_norm, t_norm)  # (B,)
    return (1 - (s_emb * e).sum(dim=1) / max_norm).mean()


def logsum_loss(ns: torch.Tensor, nt: torch.Tensor, exponent: float = 4.0) -> torch.Tensor:
    """The LogSum representation loss (Miles & Mikolajczyk, "Understanding the Role of the Projector
    in Knowledge Distillation", AAAI 2024): log of the sum over every element of |ns - nt|^exponent.

    ns, nt: (B, D) already-normalised student and teacher representations (in the paper's recipe:
    projector then BatchNorm1d without affine). Unweighted: the paper's factor 2 is the method's.
    As in the official code (roymiles/Simple-Recipe-Distillation) there is no epsilon, so identical
    inputs give -inf by definition (and a nan gradient); any real difference gives a finite value.
    """
    return torch.log((ns - nt).abs().pow(exponent).sum())
