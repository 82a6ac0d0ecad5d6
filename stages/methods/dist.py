"""DIST (Huang et al., 2022), one of VanillaKD's baselines.

DIST: Knowledge Distillation from A Stronger Teacher (Huang, You, Wang, Qian & Xu, NeurIPS 2022), a baseline
in VanillaKD. CE + tau^2 (beta * inter-class + gamma * intra-class relation loss), Pearson correlation of
softmax(./tau). kd_weight: 1 is VanillaKD's DIST baseline, the value used here; DIST's own ImageNet runs
weight the DIST term 2 (pass --method-arg kd_weight=2 for them).

The defaults below are the paper's (VanillaKD's for its baselines); ``--method-arg KEY=VALUE`` or a recipe's
``method_args:`` change them.
"""

from __future__ import annotations

from .base import Method, hard_loss, loss_parts, register_method
from .losses import dist_loss


@register_method("dist")
class DIST(Method):
    """DIST (Huang et al., 2022), a VanillaKD baseline: Pearson-correlation relations between and
    within classes, tau^2 (beta * inter + gamma * intra)."""

    needs = ("logits",)

    def __init__(self, context, beta=1.0, gamma=1.0, tau=1.0, kd_weight=1.0, ce_weight=1.0, hard_loss="ce"):
        super().__init__()
        self.beta, self.gamma, self.tau = beta, gamma, tau
        self.kd_weight, self.ce_weight, self.hard_loss = kd_weight, ce_weight, hard_loss

    @property
    def teacher_temperature(self) -> float:
        return float(self.tau)

    def forward(self, student, teacher, targets):
        ce = hard_loss(self.hard_loss, student["logits"], targets)
        dist = dist_loss(student["logits"], teacher["logits"], self.beta, self.gamma, self.tau)
        return self.ce_weight * ce + self.kd_weight * dist, loss_parts(**{self.hard_loss: ce}, dist=dist)
