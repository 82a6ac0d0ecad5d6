"""Mixup and CutMix as a recorded op: partners matched within a block, lambdas and boxes drawn, mixed targets."""

from __future__ import annotations


import numpy as np
import torch

from storage import ArraySpec

from .ops import ViewOp, pixel_box


def pair_partners(ids: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Each id's mate in a uniformly random perfect matching of the distinct ``ids``, -1 for an id alone.

    The distinct ids are ordered by their own uniforms ``u`` (one per entry of
    ``ids``; ties by id) and paired off in that order, so the matching depends
    on the set of ids and their draws, never on the order of the call. With an
    odd count the last one mixes with the first of that order, whose own mate
    is another: then one image serves three views.
    """
    ids = np.asarray(ids, dtype=np.int64)
    pool, first = np.unique(ids, return_index=True)
    if len(pool) < 2:
        return np.full(len(ids), -1, np.int64)
    order = np.lexsort((pool, u[first]))  # a uniform random permutation of the pool
    mate = np.empty(len(pool), np.int64)
    even = len(order) - len(order) % 2
    mate[order[0:even:2]], mate[order[1:even:2]] = order[1:even:2], order[0:even:2]
    if even < len(order):
        mate[order[-1]] = order[0]
    return pool[mate[np.searchsorted(pool, ids)]]


def beta_quantile(alpha: float, u: np.ndarray) -> np.ndarray:
    """Beta(alpha, alpha) samples as the inverse CDF at uniforms ``u``."""
    if alpha == 1.0:
        return u.astype(np.float64)
    from scipy.special import betaincinv  # scipy comes with scikit-learn

    return betaincinv(alpha, alpha, u)


class MixupCutmix(ViewOp):
    """timm's Mixup/CutMix per sample (its 'elem' mode), partners paired within the same block.

    For each sample, with probability ``prob`` the view mixes; if both alphas
    are set, cutmix with probability ``switch_prob`` else mixup (timm's rule).
    ``mix_partner`` is the sample's mate in a random perfect matching of the
    ids drawn together (one whole block, ``pair_partners``), never the sample
    itself, -1 for no mixing. Mates mix with each other, as timm's batch mode
    pairs a batch with its flip, so each image is decoded and rendered once
    and both mixes come from the two renders; each keeps its own lambda and box. ``mix_lam`` (float64) is the share of the sample itself:
    the Beta(alpha, alpha) draw for mixup; for cutmix 1 - the area of the
    recorded box after clipping to the view (timm's ``correct_lam``).
    ``mix_box`` (top, left, height, width, normalised) is the cutmix box,
    zeros for mixup. ``lam_at`` gives the exact share at a render size.

    Mixup blends in float64 in a fixed order, ``x * lam + p * (1 - lam)``,
    rounds half to even (``torch.round``, as timm's collate uses ``np.rint``)
    and clamps to [0, 255]; cutmix pastes the partner's pixels of the box.
    """

    fields = {
        "mix_partner": ArraySpec((), "int64"),
        "mix_lam": ArraySpec((), "float64"),
        "mix_box": ArraySpec((4,), "float32"),
    }
    draws = 6
    stream = 5
    mixes = True
    MATCH = 5  # the column of the draws that orders the matching (``pair_partners``)
    GROUP_STREAM = 6  # the matching's own stream when a group of views shares it (``ViewPlan.draw``)

    def __init__(self, mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5):
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)

    def draw(self, u, sizes, ids=None):
        n = len(u)
        if ids is None:
            raise ValueError("mixing draws need the sample ids of the block (partners come from it)")
        ids = np.asarray(ids, dtype=np.int64)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cut = u[:, 1] < self.switch_prob
        else:
            cut = np.full(n, self.cutmix_alpha > 0)
        lam = np.where(
            cut, beta_quantile(self.cutmix_alpha or 1.0, u[:, 2]), beta_quantile(self.mixup_alpha or 1.0, u[:, 2])
        )
        partner = np.where((u[:, 0] < self.prob), pair_partners(ids, u[:, 5]), -1)
        mix = partner >= 0
        # Cutmix box: a square of side sqrt(1 - lam) around a uniform centre, clipped to the view (timm's rand_bbox).
        side = np.sqrt(1.0 - lam)
        cy, cx = u[:, 3], u[:, 4]
        y0, y1 = np.clip(cy - side / 2, 0, 1), np.clip(cy + side / 2, 0, 1)
        x0, x1 = np.clip(cx - side / 2, 0, 1), np.clip(cx + side / 2, 0, 1)
        box = np.where((cut & mix)[:, None], np.stack([y0, x0, y1 - y0, x1 - x0], axis=1), 0.0).astype(np.float32)
        box64 = box.astype(np.float64)
        lam = np.where(cut, 1.0 - box64[:, 2] * box64[:, 3], lam)  # the recorded box's own area
        return {"mix_partner": partner.astype(np.int64), "mix_lam": np.where(mix, lam, 1.0), "mix_box": box}

    def apply(self, image, params, size):
        return image  # mixing needs the partner's view: ``ViewPlan.render`` calls ``mix``

    def mix(self, view: torch.Tensor, partner: torch.Tensor, params: dict) -> torch.Tensor:
        box = params["mix_box"]
        if float(box[2]) > 0 and float(box[3]) > 0:
            y0, y1, x0, x1 = pixel_box(box, view.shape[-1])
            view = view.clone()
            view[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
            return view
        lam = float(params["mix_lam"])
        # x * lam + p * (1 - lam) in float64, rounded, for each of the 256 x 256 pixel pairs: the same float
        # operations as on the whole view, element by element, so a table lookup gives the same bytes, faster.
        levels = torch.arange(256, dtype=torch.float64)
        table = torch.round(levels[:, None] * lam + levels[None, :] * (1.0 - lam)).clamp_(0, 255).to(torch.uint8)
        pairs = (view.to(torch.int32) << 8) | partner.to(torch.int32)  # x * 256 + p
        return table.view(-1).index_select(0, pairs.reshape(-1)).view(view.shape)

    @staticmethod
    def lam_at(params: dict, size: int) -> float:
        """The share of the sample's own pixels in its view at ``size`` (1.0 when it does not mix)."""
        if "mix_partner" not in params or int(params["mix_partner"]) < 0:
            return 1.0
        box = params["mix_box"]
        if float(box[2]) > 0 and float(box[3]) > 0:
            y0, y1, x0, x1 = pixel_box(box, size)
            return 1.0 - max(0, y1 - y0) * max(0, x1 - x0) / float(size * size)
        return float(params["mix_lam"])


def mixed_targets(labels, partner_labels, lam, num_classes: int, smoothing: float = 0.0):
    """timm's mixed, smoothed one-hot targets: ``(targets (B, C) float32, labelled (B,) bool)``.

    Row b is ``lam_b * smooth(y_b) + (1 - lam_b) * smooth(y_partner_b)`` with
    smooth(y) = (1 - smoothing) * onehot(y) + smoothing / C, computed in float64.
    A row is labelled when its own label is known (>= 0) and, if any of it comes
    from a partner (lam < 1), the partner's too; unlabelled rows are zeros.
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    partner = torch.as_tensor(np.asarray(partner_labels), dtype=torch.int64)
    lam = torch.as_tensor(np.asarray(lam, dtype=np.float64), dtype=torch.float64)
    off = smoothing / num_classes
    on = 1.0 - smoothing + off

    def onehot(y):
        return torch.full((len(y), num_classes), off, dtype=torch.float64).scatter_(1, y.clamp(min=0)[:, None], on)

    mask = (labels >= 0) & ((partner >= 0) | (lam >= 1.0))
    targets = onehot(labels) * lam[:, None] + onehot(partner) * (1.0 - lam)[:, None]
    targets[~mask] = 0.0
    return targets.to(torch.float32), mask
