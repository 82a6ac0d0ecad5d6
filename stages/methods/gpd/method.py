"""The GPD method: the student and its dynamic teacher trained together, the static teacher from the cache."""

from __future__ import annotations


import torch

from storage import UserError

from ..losses import dkd_loss, smoothed_soft_ce
from ..orepa import VECTOR_INIT
from ..base import Method, MethodContext, hard_loss, loss_parts, register_method
from .dynamic_teacher import DynamicTeacher


@register_method("gpd")
class GPD(Method):
    """Gap Preserving Distillation: a dynamic teacher, the student widened ``ratio`` times, trains beside the
    student it contains; the static teacher's logits come from the cache (or there is none: from scratch).

    L_D = ce_weight CE(z_D) + DKD(z_D, t), L_S = ce_weight CE(z_S) + DKD(z_S, t) + kd_weight SCE(z_S, softmax(z_D))
    with DKD at (alpha, beta, temperature) and SCE smoothed by ``smoothing``; the total is L_D + L_S.
    ``orepa``: the dynamic teacher's 3x3 stride-1 convs train as OREPA blocks, initialised ``orepa_init``
    (by default ``official`` for a student trained from scratch, ``single`` for one that starts from trained weights).
    """

    needs = ("logits",)
    requires_teacher = False
    student_needs = ("logits",)

    def __init__(
        self,
        context: MethodContext,
        ratio=2,
        kd_weight=3.0,
        smoothing=0.1,
        alpha=1.0,
        beta=0.5,
        temperature=1.0,
        ce_weight=1.0,
        noise=1e-6,
        hard_loss="ce",
        orepa=False,
        orepa_init=None,
    ):
        super().__init__()
        # As the official train_dkd.py: a student loaded from trained weights keeps its function (single), one from scratch does not.
        orepa_init = orepa_init or ("single" if context.student_trained else "official")
        if orepa_init not in VECTOR_INIT:
            raise UserError(
                f"method 'gpd' setting orepa_init must be one of {', '.join(VECTOR_INIT)}, not {orepa_init!r}"
            )
        self.ratio, self.kd_weight, self.smoothing = ratio, kd_weight, smoothing
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.noise, self.hard_loss = ce_weight, noise, hard_loss
        self.orepa = orepa_init if orepa else None

    def wrap_student(self, model):
        name = (model.pretrained_cfg or {}).get("architecture", "")
        return DynamicTeacher(model, self.ratio, self.noise, name=name, orepa=self.orepa)

    def student_outputs(self, model: DynamicTeacher, x):
        wide = model.wide(x)  # (B, C): the dynamic teacher, computed first as in the official step
        return {"logits": model(x), "wide_logits": wide}

    def export_student(self, model: DynamicTeacher):
        return model.export()

    def forward(self, student, teacher, targets):
        z_s, z_d = student["logits"], student["wide_logits"]
        ce_s, ce_d = hard_loss(self.hard_loss, z_s, targets), hard_loss(self.hard_loss, z_d, targets)
        loss_d, loss_s = self.ce_weight * ce_d, self.ce_weight * ce_s
        parts = {}
        if "logits" in teacher:  # the static teacher, cached
            t = teacher["logits"]
            target = targets.classes(t)
            dkd_d = dkd_loss(z_d, t, target, self.alpha, self.beta, self.temperature)
            dkd_s = dkd_loss(z_s, t, target, self.alpha, self.beta, self.temperature)
            loss_d, loss_s = loss_d + dkd_d, loss_s + dkd_s
            parts.update(dkd=dkd_s, wide_dkd=dkd_d)
        sce = smoothed_soft_ce(z_s, torch.softmax(z_d.detach(), dim=1), self.smoothing)
        loss_s = loss_s + self.kd_weight * sce
        # One backward of the sum gives each parameter the gradients of L_D's and L_S's backward passes added.
        hard = self.hard_loss  # the label terms named as computed: ce or bce
        return loss_d + loss_s, loss_parts(**{hard: ce_s, f"wide_{hard}": ce_d}, sce=sce, **parts)
