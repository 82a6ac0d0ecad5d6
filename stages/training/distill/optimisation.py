"""The optimiser (any timm optimizer, timm's parameter groups) and the learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from storage import UserError

from ..settings import TrainSettings


log = logging.getLogger(__name__)


def build_optimizer(s: TrainSettings, modules: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory (LAMB, AdamW, SGD...), no weight decay on biases and norm layers."""
    from timm.optim import create_optimizer_v2

    opt = s.optimizer
    if opt == "sgd":  # timm's "sgd" means Nesterov; say which explicitly
        opt = "nesterov" if s.nesterov else "momentum"
    try:
        return create_optimizer_v2(modules, opt=opt, lr=s.lr, weight_decay=s.weight_decay, momentum=s.momentum)
    except (ValueError, AssertionError) as e:
        raise UserError(f"optimizer '{s.optimizer}': {e}") from e


def lr_factor(s: TrainSettings, steps_per_epoch: int):
    """The learning-rate multiplier at each optimiser step: linear warm-up, then cosine or step decay."""
    total, warmup = s.epochs * steps_per_epoch, int(s.warmup_epochs * steps_per_epoch)
    if s.schedule not in ("cosine", "step"):
        raise UserError(f"schedule must be cosine or step, not '{s.schedule}'")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if s.schedule == "step":
            return s.lr_gamma ** sum(step >= m * steps_per_epoch for m in s.lr_milestones)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor
