"""Cross-entropy on labels alone: the from-scratch baseline and plain supervised training.

Labels only: training from scratch, the baseline every distillation run is compared with.
"""

from __future__ import annotations

from .base import Method, MethodContext, hard_loss, loss_parts, register_method


@register_method("ce")
class CrossEntropy(Method):
    """Labels only: the from-scratch baseline and plain supervised training."""

    def __init__(self, context: MethodContext, hard_loss: str = "ce"):
        super().__init__()
        self.hard_loss = hard_loss

    def forward(self, student, teacher, targets):
        loss = hard_loss(self.hard_loss, student["logits"], targets)
        return loss, loss_parts(**{self.hard_loss: loss})
