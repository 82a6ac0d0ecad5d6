"""KD++ (Wang et al., 2023): feature norm and direction with the teacher's class means.

KD++: Improving Knowledge Distillation via Regularizing Feature Norm and Direction (Wang et al., 2023). CE +
alpha * KD(T) + beta * L_nd; needs the teacher's class means (`pipeline stats --store STORE`). Pair defaults
from the paper: R34->R18 alpha 2.5 beta 1; R50->R18 alpha 4 beta 1; R152->R18 alpha 4 beta 2. The KD weight
ramps linearly from 0 over warmup_epochs (5, ImageNet's).

The defaults below are the paper's (VanillaKD's for its baselines); ``--method-arg KEY=VALUE`` or a recipe's
``method_args:`` change them.
"""

from __future__ import annotations

from torch import nn

from storage import UserError

from .base import Method, hard_loss, loss_parts, register_method, require_features
from .losses import kd_loss, nd_loss


@register_method("kdpp")
class KDPP(Method):
    """KD++ (Wang et al., 2023): CE + alpha * KD(T) + beta * L_nd, feature norm and direction.

    L_nd pulls the student embedding toward the teacher's unit class mean and
    its norm up to the teacher's. When widths differ the student feature goes
    through BatchNorm -> Dropout(0.5) -> Linear. The KD weight ramps linearly
    from 0 over ``warmup_epochs``.
    """

    needs = ("logits", "features")
    student_needs = ("logits", "features")

    def __init__(self, context, alpha=2.5, beta=1.0, temperature=1.0, warmup_epochs=5, ce_weight=1.0, hard_loss="ce"):
        super().__init__()
        require_features(context, "kdpp")
        if context.class_means is None:
            raise UserError(
                "method 'kdpp' needs the teacher's class means: compute them with `pipeline stats --store STORE --teacher-id ID`"
            )
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.warmup_epochs, self.ce_weight, self.hard_loss = warmup_epochs, ce_weight, hard_loss
        self.register_buffer("class_means", context.class_means.float())
        s, t = context.student_dim, context.teacher_dim
        self.project = nn.Sequential(nn.BatchNorm1d(s), nn.Dropout(0.5), nn.Linear(s, t)) if s != t else nn.Identity()

    def forward(self, student, teacher, targets):
        ce = hard_loss(self.hard_loss, student["logits"], targets)
        kd = kd_loss(student["logits"], teacher["logits"], self.temperature)
        embedding = self.project(student["features"])  # (B, D_t)
        nd = nd_loss(embedding, teacher["features"].norm(dim=1), self.class_means, targets.classes(teacher["logits"]))
        ramp = min(1.0, self.epoch / self.warmup_epochs) if self.warmup_epochs else 1.0
        return self.ce_weight * ce + self.alpha * ramp * kd + self.beta * nd, loss_parts(
            **{self.hard_loss: ce}, kd=kd, nd=nd
        )
