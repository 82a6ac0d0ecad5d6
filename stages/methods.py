"""Distillation methods: a registry of losses over (student outputs, teacher outputs, labels).

A method declares the teacher outputs it reads (``needs``: ``logits``,
``features``) so the loader reads only those arrays from the cache, and the
student outputs it uses (``student_needs``). It is an ``nn.Module``: any
projector it owns trains with the student. ``forward`` returns the total loss
and its named parts for logging.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from storage import UserError

from .losses import ce_loss, kd_loss

_METHODS: dict[str, type["Method"]] = {}


def register_method(name: str):
    def wrap(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type["Method"]:
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown method '{name}'{hint}: known methods are {', '.join(list_methods())}")
    return _METHODS[name]


def create_method(name: str, **kwargs) -> "Method":
    cls = method_class(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"bad settings for method '{name}': {e}") from e


class Method(nn.Module):
    name = ""
    needs: tuple[str, ...] = ()  # teacher outputs read from the cache (or a live teacher)
    student_needs: tuple[str, ...] = ("logits",)

    def forward(self, student: dict, teacher: dict, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


@register_method("ce")
class CrossEntropy(Method):
    """Labels only: the from-scratch baseline and plain supervised training."""

    def forward(self, student, teacher, labels):
        loss = ce_loss(student["logits"], labels)
        return loss, {"ce": loss.item()}


@register_method("kd")
class KD(Method):
    """Vanilla KD: ce_weight * CE(labels) + kd_weight * T^2 KL(teacher || student) at temperature T.

    Unlabelled samples (label -1) are supervised by the teacher alone.
    """

    needs = ("logits",)

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0, ce_weight: float = 1.0):
        super().__init__()
        self.temperature, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight

    def forward(self, student, teacher, labels):
        ce = ce_loss(student["logits"], labels)
        kd = kd_loss(student["logits"], teacher["logits"], self.temperature)
        return self.ce_weight * ce + self.kd_weight * kd, {"ce": ce.item(), "kd": kd.item()}
