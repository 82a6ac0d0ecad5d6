"""Vanilla KD (Hinton et al., 2015) at scale, as VanillaKD (Hao et al., 2023) trains it.

Vanilla knowledge distillation (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network"):
ce_weight * CE(labels) + kd_weight * T^2 * KL(softmax(t/T) || softmax(s/T)).

The defaults below are the paper's (VanillaKD's for its baselines); ``--method-arg KEY=VALUE`` or a recipe's
``method_args:`` change them.
"""

from __future__ import annotations

from .base import Method, hard_loss, loss_parts, register_method
from .losses import kd_loss


@register_method("kd")
class KD(Method):
    """Vanilla KD: ce_weight * hard loss + kd_weight * T^2 KL(teacher || student) at temperature T.

    Unlabelled samples are supervised by the teacher alone. ``hard_loss: bce``
    trains as VanillaKD (Hao et al., 2023) does, on (mixed) targets.
    """

    needs = ("logits",)

    def __init__(self, context, temperature=1.0, kd_weight=1.0, ce_weight=1.0, hard_loss="ce"):
        super().__init__()
        self.temperature, self.kd_weight, self.ce_weight, self.hard_loss = temperature, kd_weight, ce_weight, hard_loss

    def forward(self, student, teacher, targets):
        ce = hard_loss(self.hard_loss, student["logits"], targets)
        kd = kd_loss(student["logits"], teacher["logits"], self.temperature)
        return self.ce_weight * ce + self.kd_weight * kd, loss_parts(**{self.hard_loss: ce}, kd=kd)
