"""The projector + BatchNorm + LogSum recipe (Miles & Mikolajczyk, 2024).

Understanding the Role of the Projector in Knowledge Distillation (Miles & Mikolajczyk, AAAI 2024): student
feature -> Linear -> BatchNorm (no affine, eps 1e-4), teacher feature -> BatchNorm (no affine); total = CE + 2
* log(sum |difference|^4) + KL at T = 1.

The defaults below are the paper's (VanillaKD's for its baselines); ``--method-arg KEY=VALUE`` or a recipe's
``method_args:`` change them.
"""

from __future__ import annotations

from torch import nn

from .base import Method, hard_loss, loss_parts, register_method, require_features
from .losses import kd_loss, logsum_loss


@register_method("srd")
class SRD(Method):
    """The projector + BatchNorm + LogSum recipe (Miles & Mikolajczyk, 2024).

    Student feature -> Linear -> BatchNorm1d (no affine, eps 1e-4); teacher
    feature -> its own BatchNorm1d (no affine); L_rep = log of the sum of
    |difference|^4 over the batch; total = CE + rep_weight * L_rep + kd_weight * KL(T).
    """

    needs = ("logits", "features")
    student_needs = ("logits", "features")

    def __init__(
        self, context, rep_weight=2.0, exponent=4.0, kd_weight=1.0, temperature=1.0, ce_weight=1.0, hard_loss="ce"
    ):
        super().__init__()
        require_features(context, "srd")
        self.rep_weight, self.exponent, self.kd_weight = rep_weight, exponent, kd_weight
        self.temperature, self.ce_weight, self.hard_loss = temperature, ce_weight, hard_loss
        self.project = nn.Sequential(
            nn.Linear(context.student_dim, context.teacher_dim),
            nn.BatchNorm1d(context.teacher_dim, eps=1e-4, affine=False),
        )
        self.teacher_norm = nn.BatchNorm1d(context.teacher_dim, eps=1e-4, affine=False)

    def forward(self, student, teacher, targets):
        ce = hard_loss(self.hard_loss, student["logits"], targets)
        kd = kd_loss(student["logits"], teacher["logits"], self.temperature)
        rep = logsum_loss(self.project(student["features"]), self.teacher_norm(teacher["features"]), self.exponent)
        total = self.ce_weight * ce + self.rep_weight * rep + self.kd_weight * kd
        return total, loss_parts(**{self.hard_loss: ce}, kd=kd, rep=rep)
