"""Top-k teacher logits that keep the teacher's tail: what a top-k store row holds, and the logits rebuilt from it.

A row of a top-k store (``k`` of ``C`` classes) holds four arrays, as many
objects per unit as the plain top-k layout had:

==========  ======  ====================================================================
array       shape   what
==========  ======  ====================================================================
topk_logp   (k+1,)  log-probabilities of the k largest logits (logit - log-sum-exp), then
                    of the target class (the mixed target's, as DKD uses it)
topk_index  (k+1,)  their classes, then the target class
tail        (2,)    log of the probability mass outside the top k (computed exactly), and
                    the mean log-probability of the classes outside the top k
logsumexp   ()      float32: the exact softmax normaliser of the full row
==========  ======  ====================================================================

Log-probabilities rather than logits, and the tail's mass as its own log rather
than ``1 - sum(top k)``: a float16 logit near 16 is off by up to 0.008, which
moves a 0.9 top-1 probability by 0.7 % and with it ``1 - sum`` by more than a
small tail holds (a confident teacher's rows came out <= 0 and were clamped).
Stored this way every probability, the tail's included, is exact to the
relative precision of the stored float (about 5e-4 in float16), and no row is
ever clamped. All of it is computed in float64 from the full float32 logits.

The rebuild (``TopK.logits``) puts the top k and the target class back and
spreads the rest of the tail mass evenly over the other classes. At a
temperature T the softened tail mass ``sum_tail exp(z / T)`` depends on the
tail's spread, which a uniform tail would get wrong (it overstates it), so
the tail value is chosen to match a second-order model of the tail's
cumulant function ``K(b) = log sum_tail exp(b * logp)``: exact at b = 1 (the
stored mass), slope the stored mean at b = 0, i.e. Gaussian tail logits. At
T = 1 this is the exact tail mass and nothing else; at T > 1 it fixes the
tail's total but not its shape, which top-k cannot know (``tail_kl`` estimates
what that costs; ``pipeline inspect`` prints it for a store at given temperatures).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ARRAYS = ("topk_logp", "topk_index", "tail", "logsumexp")
# The share of a tail that stays with the other classes when the stored target holds (to rounding) all of it.
MIN_REST = 2.0**-11


@dataclass(frozen=True)
class TopK:
    """A batch of top-k rows (see the module docstring), unpacked; tensors of B rows, float32 or float64 and int64."""

    topk_logp: torch.Tensor  # (B, k)
    topk_index: torch.Tensor  # (B, k)
    logsumexp: torch.Tensor  # (B,)
    tail_logp: torch.Tensor  # (B,)  -inf when k = C
    tail_mean: torch.Tensor  # (B,)  0 when k = C
    target_logp: torch.Tensor  # (B,)
    target_index: torch.Tensor  # (B,)

    # -- writing --------------------------------------------------------------------------------
    @classmethod
    def of(cls, logits: torch.Tensor, k: int, target: torch.Tensor) -> TopK:
        """The exact top-k rows of ``logits`` (B, C) for ``target`` classes (B,), in float64."""
        z = logits.double()
        B, C = z.shape
        lse = torch.logsumexp(z, dim=1)  # (B,)
        values, index = z.topk(k, dim=1)  # (B, k)
        if C > k:
            tail_logp = torch.logsumexp(z.scatter(1, index, float("-inf")), dim=1) - lse  # the top k left out
            tail_mean = (z.sum(1) - values.sum(1)) / (C - k) - lse
        else:
            tail_logp, tail_mean = torch.full((B,), float("-inf"), dtype=z.dtype), torch.zeros(B, dtype=z.dtype)
        target = target.long().view(-1)
        target_logp = z.gather(1, target[:, None]).squeeze(1) - lse
        return cls(values - lse[:, None], index, lse.float(), tail_logp, tail_mean, target_logp, target)

    def rows(self, dtype: str, index_dtype: str) -> dict[str, np.ndarray]:
        """Store rows (``ARRAYS``): log-probabilities and tail statistics in ``dtype``, classes in ``index_dtype``,
        the log-sum-exp in float32."""
        return {
            "topk_logp": torch.cat([self.topk_logp, self.target_logp[:, None]], 1).numpy().astype(dtype),  # (B, k + 1)
            "topk_index": torch.cat([self.topk_index, self.target_index[:, None]], 1).numpy().astype(index_dtype),
            "tail": torch.stack([self.tail_logp, self.tail_mean], 1).numpy().astype(dtype),  # (B, 2)
            "logsumexp": self.logsumexp.numpy().astype("float32"),
        }

    # -- reading --------------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: dict) -> TopK:
        """A batch from store rows (``ARRAYS``, numpy or tensors), as float64 and int64 tensors."""
        logp = torch.as_tensor(np.asarray(rows["topk_logp"])).double()  # (B, k + 1)
        index = torch.as_tensor(np.asarray(rows["topk_index"])).long()
        tail = torch.as_tensor(np.asarray(rows["tail"])).double()  # (B, 2)
        lse = torch.as_tensor(np.asarray(rows["logsumexp"])).double()
        return cls(logp[:, :-1], index[:, :-1], lse, tail[:, 0], tail[:, 1], logp[:, -1], index[:, -1])

    def target_in_tail(self, num_classes: int) -> torch.Tensor:
        """(B,) whether the target class is outside the top k (then its stored log-probability is placed)."""
        if num_classes <= self.topk_index.shape[1]:
            return torch.zeros(self.target_index.shape, dtype=torch.bool)
        return (self.topk_index != self.target_index[:, None]).all(1)

    def rest(self, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The classes the rebuild spreads evenly: (count, log of their mass, mean log-probability), each (B,).

        The tail without the target class where the target is outside the top k.
        """
        k = self.topk_index.shape[1]
        out = self.target_in_tail(num_classes)
        # Decoding a batch spends more on these small ops over B-row vectors (microseconds each) than on its
        # (B, C) matrix, so the usual batch, every target inside the top k, takes the short way (same values).
        if not out.any():
            return torch.full(out.shape, float(num_classes - k), dtype=torch.float64), self.tail_logp, self.tail_mean
        count = (num_classes - k - out.long()).double()  # (B,)
        # log(tail - target) = tail + log(1 - exp(target - tail)); rounding may put target above tail.
        share = (-torch.expm1((self.target_logp - self.tail_logp).clamp_max(0.0))).clamp_min(MIN_REST)
        mass = torch.where(out, self.tail_logp + torch.log(share), self.tail_logp)
        mean = torch.where(
            out, (self.tail_mean * (num_classes - k) - self.target_logp) / count.clamp_min(1), self.tail_mean
        )
        return count, mass, mean

    def rest_logp(self, num_classes: int, temperature: float = 1.0) -> torch.Tensor:
        """(B,) the log-probability each evenly spread class gets, chosen for ``temperature``.

        With the rest's cumulant function modelled as ``K(b) = L + b m + b^2 a``
        (L = log count, m = mean log-probability, a = the spread, from the stored
        mass ``K(1)``), the value c whose ``count * exp(c / T)`` equals ``exp(K(1 / T))``
        is ``K(1) - L - a (1 - 1 / T)``: at T = 1 the stored mass exactly.
        """
        count, mass, mean = self.rest(num_classes)
        uniform = mass - torch.log(count.clamp_min(1))  # log(mass / count): the T = 1 value
        spread = (uniform - mean).clamp_min(0.0)  # a >= 0 (Jensen); rounding can make it slightly negative
        return uniform - spread * (1.0 - 1.0 / temperature)

    def logits(self, num_classes: int, temperature: float = 1.0) -> torch.Tensor:
        """Full float32 logits (B, C): the stored classes placed, the rest spread evenly (see ``rest_logp``).

        The logits are ``log-probability + log-sum-exp``, so their softmax is the
        teacher's at T = 1 to the stored precision, and their scale is the teacher's.
        """
        B, k = self.topk_index.shape
        lse = self.logsumexp
        # Each logit is float32(log-probability + log-sum-exp), summed in float64 as before, but only the B + B k
        # distinct values are: the (B, C) matrix is filled in float32 once, not built and added in float64.
        full = torch.empty(B, num_classes, dtype=torch.float32)
        if num_classes > k:
            full.copy_((self.rest_logp(num_classes, temperature) + lse).float()[:, None].expand(B, num_classes))
            # Every row's target, then the top k over it: a target inside the top k gets its top-k value.
            full.scatter_(1, self.target_index[:, None], (self.target_logp + lse).float()[:, None])
        return full.scatter_(1, self.topk_index, (self.topk_logp + lse[:, None]).float())

    # -- what the rebuild cannot know -----------------------------------------------------------
    def tail_share(self, num_classes: int, temperature: float = 1.0) -> torch.Tensor:
        """(B,) the share of the softened (T) distribution that the rebuild spreads evenly: where it can be wrong."""
        z = self.logits(num_classes, temperature).double() / temperature
        p = torch.softmax(z, dim=1)
        kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, self.topk_index, True)
        kept[torch.arange(len(p)), self.target_index] = True
        return p.masked_fill(kept, 0.0).sum(1)

    def tail_kl(self, num_classes: int, temperature: float = 1.0) -> torch.Tensor:
        """(B,) an estimate of KL(full || rebuilt) at ``temperature``, in nats, from the stored statistics alone.

        Under the Gaussian model of ``rest_logp`` the spread a is sigma^2 / 2, and
        the evenly spread classes lose KL(true || uniform) = a / T^2 of their
        share of the softened distribution; the top k and the target are exact.
        """
        count, mass, mean = self.rest(num_classes)
        spread = (mass - torch.log(count.clamp_min(1)) - mean).clamp_min(0.0)
        return self.tail_share(num_classes, temperature) * spread / temperature**2


def logits_from_topk(rows: dict, num_classes: int, temperature: float = 1.0) -> torch.Tensor:
    """Full float32 logits (B, C) from top-k store rows (``TopK.logits``)."""
    return TopK.from_rows(rows).logits(num_classes, temperature)


# -- fidelity: the rebuild against the full logits -------------------------------------------------


def kl(full: torch.Tensor, other: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B,) KL(softmax(full / T) || softmax(other / T)) in nats."""
    p = torch.log_softmax(full.double() / temperature, dim=1)
    q = torch.log_softmax(other.double() / temperature, dim=1)
    return (p.exp() * (p - q)).sum(1).clamp_min(0.0)  # rounding can give -1e-17
