"""Distillation methods: a registry of losses over (student outputs, teacher outputs, targets).

A method is one class, registered by name, that declares everything the
trainer must know about it:

* ``needs``: the teacher outputs it reads (``logits`` (B, C), ``features``
  (B, D), ``tokens`` (B, T, D)), so the loader reads only those arrays from
  the cache and a store or teacher that lacks one is refused before any work;
  ``requires_teacher = False`` when it also trains without any teacher;
* ``student_needs``: the student outputs it uses (``logits``, ``features``,
  ``tokens`` after the final norm), computed by ``student_outputs``;
* three hooks whose defaults leave the student alone, for methods that own
  the student's forward (GPD trains a widened network that contains it):
  ``wrap_student(model)``, called once before the optimiser is built, returns
  the module that trains in the student's place; ``student_outputs(model, x)``,
  called every step inside the (DDP-wrapped) forward, returns the dict that
  ``forward`` receives (by default the student's outputs through
  ``adapt_outputs``, the hook a method overrides to read them its own way);
  ``export_student(model)`` returns the plain timm student that is saved.

It is an ``nn.Module``: any projector it owns trains with the student. It is
built from a ``MethodContext`` (class count, widths and token shapes of
student and teacher, teacher class means: see ``method_context``) plus its
own settings, and ``forward`` returns the total loss and its named parts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from storage import UserError
from storage.registry import Registry

from ..model_outputs import student_forward, token_prefix, token_shape

_METHODS: Registry = Registry("method")  # filled by @register_method as stages.methods imports each method's module


def register_method(name: str):
    """Class decorator: register a ``Method`` subclass under ``name`` (``--method NAME``, ``kd@t1+NAME@t2``).

    Args:
        name: the method's name; a second registration under one name is refused.

    Returns:
        The decorator, which sets ``cls.name`` and returns the class.

    Example:
        >>> @register_method("my_kd")
        ... class MyKD(Method):
        ...     needs = ("logits",)
    """

    def wrap(cls):
        cls.name = name
        return _METHODS.add(name, cls)

    return wrap


def list_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_METHODS)


def method_class(name: str) -> type["Method"]:
    """The ``Method`` subclass registered under ``name``.

    Args:
        name: a registered method name.

    Returns:
        The class (not an instance: ``create_method`` builds one).

    Raises:
        UserError: an unknown name, with the close matches and the known names.
    """
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown method '{name}'{hint}: known methods are {', '.join(list_methods())}")
    return _METHODS[name]


@dataclass
class MethodContext:
    """What a method may need to know before training, about the student and the teacher it will see."""

    num_classes: int
    student_dim: int  # width of the student's pooled features
    teacher_dim: int | None = None  # width of the teacher's pooled features
    class_means: torch.Tensor | None = None  # (C, D) teacher class means, from the store's stats
    epochs: int = 1
    student_tokens: tuple[int, int] | None = None  # (T, D) of the student's tokens, when the method reads them
    teacher_tokens: tuple[int, int] | None = None  # (T, D) of the teacher's tokens, when the method reads them
    teacher_token_prefix: int = 0  # leading teacher tokens that are not patches (1: CLS)
    student_token_prefix: int = 0  # the same for the student's tokens
    has_teacher: bool = True  # False: training without a teacher (methods with requires_teacher = False)
    size: int | None = None  # the student's input size
    student_trained: bool = False  # the student starts from trained weights (--student-weights), not at random


def method_context(
    cls: type["Method"],
    model: nn.Module,
    teacher,
    *,
    num_classes: int,
    size: int,
    epochs: int,
    student_trained: bool = False,
) -> MethodContext:
    """The context for method class ``cls``, from the built student ``model`` and a ``TeacherSource`` (or None).

    Only what ``cls`` declares is looked up: token shapes cost a dry forward of the student, class
    means a read of the store's statistics.
    """
    reads = teacher is not None
    return MethodContext(
        num_classes=num_classes,
        student_dim=model.num_features,
        teacher_dim=teacher.feature_dim if reads else None,
        class_means=teacher.class_means() if reads and "features" in cls.needs else None,
        epochs=epochs,
        student_tokens=token_shape(model, size) if "tokens" in cls.student_needs else None,
        teacher_tokens=teacher.token_shape if reads and "tokens" in cls.needs else None,
        teacher_token_prefix=teacher.token_prefix if reads and "tokens" in cls.needs else 0,
        student_token_prefix=token_prefix(model) if "tokens" in cls.student_needs else 0,
        has_teacher=reads,
        size=size,
        student_trained=student_trained,
    )


@dataclass
class Targets:
    """A batch's targets: its labels (-1 where the student may not use one) and its mixed, smoothed target rows."""

    labels: torch.Tensor  # (B,) class index; -1 where the student may not use the label
    soft: torch.Tensor  # (B, C) mixed and smoothed target rows; zero rows where unlabelled

    @property
    def labelled(self) -> torch.Tensor:
        """(B,) bool: the rows whose label the student may use."""
        return self.labels >= 0

    def classes(self, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """One class per row for losses that need one: the argmax of the (mixed) target, or the
        teacher's top class where the label may not be used."""
        hard = torch.where(self.labelled, self.soft.argmax(1), -1)
        if teacher_logits is not None:
            hard = torch.where(self.labelled, hard, teacher_logits.argmax(1))
        return hard


def create_method(name: str, context: MethodContext, **kwargs) -> "Method":
    """An instance of method ``name`` for a run described by ``context``.

    Args:
        name: a registered method name.
        context: what the method may need to know about the student and the teacher (``method_context``).
        **kwargs: the method's own settings (``--method-arg KEY=VALUE``).

    Returns:
        The method, an ``nn.Module`` whose ``forward(student, teacher, targets)`` gives (loss, named parts).

    Raises:
        UserError: an unknown name, or settings the method does not take.
    """
    cls = method_class(name)
    try:
        return cls(context, **kwargs)
    except TypeError as e:
        raise UserError(f"bad settings for method '{name}': {e}") from e


def hard_loss(kind: str, s: torch.Tensor, targets: Targets) -> torch.Tensor:
    """The label term over labelled rows: soft-target cross-entropy or per-class BCE (VanillaKD's)."""
    rows = targets.labelled
    if not rows.any():
        return s.sum() * 0.0  # keeps the graph, so every step has the same structure
    if kind == "ce":
        return torch.sum(-targets.soft[rows] * F.log_softmax(s[rows], dim=1), dim=1).mean()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(s[rows], targets.soft[rows])
    raise UserError(f"hard_loss must be ce or bce, not '{kind}'")


class Method(nn.Module):
    """A distillation method: declares what it reads (``needs`` of the teacher, ``student_needs`` of the student),
    and ``forward(student, teacher, targets)`` returns the loss and its named parts for the epoch lines. The loop
    calls the hooks below; the defaults fit a method that trains the student as it is."""

    name = ""
    needs: tuple[str, ...] = ()  # teacher outputs read from the cache (or a live teacher)
    requires_teacher = True  # False: also trains without a teacher (then ``teacher`` is {} in forward)
    student_needs: tuple[str, ...] = ("logits",)
    epoch = 0  # set by the trainer at the start of each epoch

    @property
    def teacher_temperature(self) -> float:
        """The temperature this method softens teacher logits at: a top-k cache rebuilds its tail for it
        (``stages.cache.topk``). Default: the method's ``temperature`` setting, else 1."""
        return float(getattr(self, "temperature", 1.0))

    def wrap_student(self, model: nn.Module) -> nn.Module:
        """The module that trains in the student's place: its parameters go to the optimiser, its state
        to checkpoints, and ``module(x)`` gives the student's logits for evaluation. Default: the student."""
        return model

    def student_outputs(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student outputs ``forward`` receives, from the module ``wrap_student`` returned."""
        return self.adapt_outputs(model, student_forward(model, x, self.student_needs))

    def adapt_outputs(self, model: nn.Module, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student's plain outputs as this method reads them (CosPress: logits of a probe on detached features).
        A composite runs the student once and adapts its outputs for each part. Default: as they are."""
        return out

    def export_student(self, model: nn.Module) -> nn.Module:
        """The plain timm student to save, from the module ``wrap_student`` returned. Default: that module."""
        return model

    def forward(self, student: dict, teacher: dict, targets: Targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch.

        Args:
            student: the student's outputs by name (``logits``, ``features``, ``tokens``), as ``student_needs`` asks.
            teacher: the teacher's outputs by name, as ``needs`` asks; ``{}`` when training without a teacher.
            targets: the batch's labels and target rows.

        Returns:
            (the loss to minimise, its named terms for the epoch lines: ``loss_parts``).
        """
        raise NotImplementedError


def loss_parts(**terms: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named loss terms for logging, detached and left on the device (the trainer reads them once an epoch)."""
    return {k: v.detach() for k, v in terms.items()}


def require_features(context: MethodContext, method: str) -> None:
    if context.teacher_dim is None:
        raise UserError(f"method '{method}' needs teacher features: extract with --outputs logits,features")
