"""Distillation losses on plain tensors. Each returns a scalar: the batch mean as its paper defines it.

The losses take tensors only (no model, no method object): a method combines them and returns the total with its
named parts. Anyone may import them for their own loop.

Example:
    >>> from stages.methods.losses import kd_loss
    >>> loss = kd_loss(student_logits, batch.teachers["beitv2_l"]["logits"], temperature=1.0)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "kd_loss",
    "dkd_loss",
    "dist_loss",
    "nd_loss",
    "logsum_loss",
    "joint_similarity_log_probs",
    "similarity_kl",
    "flat_cosine_loss",
    "smoothed_soft_ce",
]


def kd_loss(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton's KD: T^2 * mean over the batch of KL(softmax(t/T) || softmax(s/T)).

    Args:
        s: the student's logits, (B, C).
        t: the teacher's logits for the same views, (B, C) (a top-k cache's rows rebuilt at this temperature).
        temperature: T, the softening of both distributions; the T^2 factor keeps the gradient's scale.

    Returns:
        The scalar loss.
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

    Args:
        s: the student's logits, (B, C), C >= 2.
        t: the teacher's logits, (B, C).
        target: the class index of each row, (B,): the class TCKD splits off.
        alpha: the weight of TCKD, the target/non-target split.
        beta: the weight of NCKD, the distribution over the non-target classes.
        temperature: T, the softening of every distribution.

    Returns:
        The scalar loss.

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


def dist_loss(
    s: torch.Tensor, t: torch.Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0
) -> torch.Tensor:
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

    With p = softmax(z/tau) as (B, C) matrices:
        inter = 1 - mean over samples of Pearson(p_s[i, :], p_t[i, :])   (relation across classes)
        intra = 1 - mean over classes of Pearson(p_s[:, c], p_t[:, c])   (relation across the batch)
        loss = tau^2 * (beta * inter + gamma * intra)

    Pearson uses eps = 1e-8 on the norm product as the official hunto/DIST_KD code does, so a row or
    column with no variance (e.g. B = 1 for intra) counts as correlation 0.

    Args:
        s: the student's logits, (B, C).
        t: the teacher's logits, (B, C).
        beta: the weight of the inter-class relation (each sample's row).
        gamma: the weight of the intra-class relation (each class's column over the batch).
        tau: the temperature of both softmaxes.

    Returns:
        The scalar loss.
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

    As in the official code (WangYZ1608/Knowledge-Distillation-via-ND,
    ``DirectNormLoss``) the larger norm is chosen per sample, the student's on a tie, and the
    gradient flows through whichever norm is chosen.

    Args:
        s_emb: the student's embeddings, (B, D), already projected to the teacher's width D.
        t_norm: the norm of the teacher's embedding of the same view, (B,).
        class_means: the teacher's class means, (C, D) (``pipeline stats``; normalised here).
        target: the class index of each row, (B,): the class mean it is pulled towards.

    Returns:
        The scalar loss.
    """
    e = F.normalize(class_means.to(s_emb), dim=1)[target.long()]  # (B, D) unit class-mean directions
    s_norm = s_emb.norm(dim=1)  # (B,)
    t_norm = t_norm.to(s_norm)
    max_norm = torch.where(s_norm >= t_norm, s_norm, t_norm)  # (B,)
    return (1 - (s_emb * e).sum(dim=1) / max_norm).mean()


def logsum_loss(ns: torch.Tensor, nt: torch.Tensor, exponent: float = 4.0) -> torch.Tensor:
    """The LogSum representation loss (Miles & Mikolajczyk, "Understanding the Role of the Projector
    in Knowledge Distillation", AAAI 2024): log of the sum over every element of |ns - nt|^exponent.

    Unweighted: the paper's factor 2 is the method's. As in the official code
    (roymiles/Simple-Recipe-Distillation) there is no epsilon, so identical inputs give -inf by
    definition (and a nan gradient); any real difference gives a finite value.

    Args:
        ns: the student's representations, (B, D), already normalised (in the paper's recipe: a projector,
            then BatchNorm1d without affine).
        nt: the teacher's representations, (B, D), normalised the same way.
        exponent: the power of each absolute difference (the paper's 4).

    Returns:
        The scalar loss.
    """
    return torch.log((ns - nt).abs().pow(exponent).sum())


# -- CosPress (Mannix & Bui, "Preserving Angles Improves Feature Distillation of Foundation Models") --

# Self-pairs get this much less than the lowest similarity logit a pair can have (cosine -1): their
# probability is exactly 0 in float32 and float64, and everything stays finite (no -inf - -inf).
_SELF_GAP = 1e4


def _cosines(x: torch.Tensor) -> torch.Tensor:
    """(..., N, D) -> (..., N, N) pairwise cosines, in float32 even under autocast: at temperature 0.01 a
    bfloat16 cosine's rounding (~4e-3) would move the logits by ~0.4."""
    with torch.autocast(x.device.type, enabled=False):
        x = F.normalize(x.float(), dim=-1)
        return x @ x.transpose(-1, -2)


def _joint_log_probs(cos: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = cos / temperature  # (..., N, N)
    self_pairs = torch.eye(cos.shape[-1], dtype=torch.bool, device=cos.device)
    logits = logits.masked_fill(self_pairs, -1.0 / temperature - _SELF_GAP)
    log_cond = F.log_softmax(logits, dim=-1)  # log p(j|i), rows sum to 1
    log_sym = torch.logaddexp(log_cond, log_cond.transpose(-1, -2).contiguous())  # log (p(j|i) + p(i|j))
    # Every row of p(j|i) sums to 1, so the N x N sums of p(j|i) + p(i|j) are exactly 2N: no log-sum-exp needed.
    return log_sym - math.log(2 * cos.shape[-1])


def joint_similarity_log_probs(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """t-SNE-style joint distribution over the pairs of vectors in each set, from their cosines.

    With c_ij the cosine of vectors i and j:
        p(j|i) = softmax over j != i of c_ij / temperature      (self-pairs excluded)
        p_ij   = (p(j|i) + p(i|j)) / (2 N)                        (symmetric, sums to 1 over i, j)

    Args:
        x: the sets of vectors, (..., N, D): N vectors per set (the tokens of one image, say).
        temperature: the softmax temperature of the cosines (CosPress uses 0.01 to 0.10).

    Returns:
        log p_ij, (..., N, N); the diagonal holds a finite, very negative number (p = 0).
    """
    return _joint_log_probs(_cosines(x), temperature)


def similarity_kl(teacher: torch.Tensor, mapped: torch.Tensor, temperatures) -> torch.Tensor:
    """CosPress's similarity-preserving loss: how far the mapping moves the cosine structure of each set.

    For each temperature t, the KL divergence between the joint similarity distributions
    (``joint_similarity_log_probs``), summed over the N x N pairs of a set, averaged over the B sets;
    then averaged over the temperatures. Zero when the mapping preserves every cosine, whatever the widths.

    Args:
        teacher: the teacher's vectors, (B, N, D_t): B sets of N vectors (the tokens of one image; or B = 1
            and the CLS tokens of a whole batch).
        mapped: the same vectors after the mapping head, (B, N, D_s).
        temperatures: the temperatures to average over (a sequence of floats).

    Returns:
        The scalar loss.
    """
    cos_p, cos_q = _cosines(teacher), _cosines(mapped)  # once, for every temperature
    total = 0.0
    for t in temperatures:
        log_p, log_q = _joint_log_probs(cos_p, t), _joint_log_probs(cos_q, t)  # (B, N, N)
        total = total + (log_p.exp() * (log_p - log_q)).sum(dim=(-2, -1)).mean()
    return total / len(temperatures)


def flat_cosine_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """1 - cosine between s and t flattened per sample, averaged over the batch: (B, ...) -> scalar.

    For tokens (B, T, D) this is one cosine per image over all its tokens together, as the
    official CosPress code computes it (not a mean of per-token cosines).

    Args:
        s: the student's outputs, (B, ...): features (B, D) or tokens (B, T, D).
        t: the targets of the same shape (CosPress: the mapped teacher tokens, detached).

    Returns:
        The scalar loss.
    """
    return (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean()


# -- GPD (Guo et al., "Gap Preserving Distillation by Building Bidirectional Mappings with a Dynamic Teacher") --


def smoothed_soft_ce(s: torch.Tensor, p: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Soft-target cross-entropy with label smoothing, GPD's "SCE" between the student and the dynamic teacher:

        mean over the batch of (1 - smoothing) * sum_c -p_c log q_c + smoothing * mean_c -log q_c

    with q = softmax(s).

    Args:
        s: the student's logits, (B, C).
        p: the target probabilities, (B, C) (GPD: the dynamic teacher's softmax, detached).
        smoothing: the share of the loss spread evenly over the classes.

    Returns:
        The scalar loss.
    """
    log_q = F.log_softmax(s, dim=1)
    return ((1 - smoothing) * (-p * log_q).sum(dim=1) + smoothing * (-log_q).mean(dim=1)).mean()
