"""Decoupled KD (Zhao et al., 2022), one of VanillaKD's baselines.

Decoupled Knowledge Distillation (Zhao, Cui, Song, Qiu & Liang, CVPR 2022), a baseline in VanillaKD. CE +
alpha * TCKD + beta * NCKD at temperature T. beta: 2 is VanillaKD's DKD baseline (Hao et al., 2023), the value
used here; DKD's own ImageNet ResNet-34 -> ResNet-18 run uses beta 0.5 (and 2 for ResNet-50 -> MobileNet):
pass --method-arg beta=0.5 for it.

The defaults below are the paper's (VanillaKD's for its baselines); ``--method-arg KEY=VALUE`` or a recipe's
``method_args:`` change them.
"""

from __future__ import annotations

from .base import Method, hard_loss, loss_parts, register_method
from .losses import dkd_loss


@register_method("dkd")
class DKD(Method):
    """Decoupled KD (Zhao et al., 2022), a VanillaKD baseline: alpha * TCKD + beta * NCKD at T, ramped in
    linearly over ``warmup_epochs``. The target class is the argmax of the (mixed) target."""

    needs = ("logits",)

    def __init__(self, context, alpha=1.0, beta=2.0, temperature=1.0, ce_weight=1.0, warmup_epochs=0, hard_loss="ce"):
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.warmup_epochs, self.hard_loss = ce_weight, warmup_epochs, hard_loss

    def forward(self, student, teacher, targets):
        ce = hard_loss(self.hard_loss, student["logits"], targets)
        target = targets.classes(teacher["logits"])
        dkd = dkd_loss(student["logits"], teacher["logits"], target, self.alpha, self.beta, self.temperature)
        ramp = min(1.0, (self.epoch + 1) / self.warmup_epochs) if self.warmup_epochs else 1.0
        return self.ce_weight * ce + ramp * dkd, loss_parts(**{self.hard_loss: ce}, dkd=dkd)
