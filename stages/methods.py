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
  ``forward`` receives; ``export_student(model)`` returns the plain timm
  student that is saved.

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

from .losses import dist_loss, dkd_loss, kd_loss, logsum_loss, nd_loss
from .student import student_forward, token_prefix, token_shape

_METHODS: dict[str, type["Method"]] = {}
# Methods that live in a file of their own register when it is imported: one line each, as timm's model files.
METHOD_MODULES = ("stages.cospress", "stages.gpd")


def register_method(name: str):
    def wrap(cls):
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def _import_method_modules() -> None:
    import importlib

    for module in METHOD_MODULES:
        importlib.import_module(module)


def list_methods() -> list[str]:
    _import_method_modules()
    return sorted(_METHODS)


def method_class(name: str) -> type["Method"]:
    _import_method_modules()
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


def method_context(cls: type["Method"], model: nn.Module, teacher, *, num_classes: int, size: int, epochs: int) -> MethodContext:
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
    )


@dataclass
class Targets:
    labels: torch.Tensor  # (B,) class index; -1 where the student may not use the label
    soft: torch.Tensor  # (B, C) mixed and smoothed target rows; zero rows where unlabelled

    @property
    def labelled(self) -> torch.Tensor:
        return self.labels >= 0

    def classes(self, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
        """One class per row for losses that need one: the argmax of the (mixed) target, or the
        teacher's top class where the label may not be used."""
        hard = torch.where(self.labelled, self.soft.argmax(1), -1)
        if teacher_logits is not None:
            hard = torch.where(self.labelled, hard, teacher_logits.argmax(1))
        return hard


def create_method(name: str, context: MethodContext, **kwargs) -> "Method":
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
    name = ""
    needs: tuple[str, ...] = ()  # teacher outputs read from the cache (or a live teacher)
    requires_teacher = True  # False: also trains without a teacher (then ``teacher`` is {} in forward)
    student_needs: tuple[str, ...] = ("logits",)
    epoch = 0  # set by the trainer at the start of each epoch

    @property
    def teacher_temperature(self) -> float:
        """The temperature this method softens teacher logits at: a top-k cache rebuilds its tail for it
        (``stages.topk``). Default: the method's ``temperature`` setting, else 1."""
        return float(getattr(self, "temperature", 1.0))

    def wrap_student(self, model: nn.Module) -> nn.Module:
        """The module that trains in the student's place: its parameters go to the optimiser, its state
        to checkpoints, and ``module(x)`` gives the student's logits for evaluation. Default: the student."""
        return model

    def student_outputs(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The student outputs ``forward`` receives, from the module ``wrap_student`` returned."""
        return student_forward(model, x, self.student_needs)

    def export_student(self, model: nn.Module) -> nn.Module:
        """The plain timm student to save, from the module ``wrap_student`` returned. Default: that module."""
        return model

    def forward(self, student: dict, teacher: dict, targets: Targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


def _parts(**terms: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named loss terms for logging, detached and left on the device (the trainer reads them once an epoch)."""
    return {k: v.detach() for k, v in terms.items()}


@register_method("ce")
class CrossEntropy(Method):
    """Labels only: the from-scratch baseline and plain supervised training."""

    def __init__(self, context: MethodContext, hard_loss: str = "ce"):
        super().__init__()
        self.hard_loss = hard_loss

    def forward(self, student, teacher, targets):
        loss = hard_loss(self.hard_loss, student["logits"], targets)
        return loss, _parts(**{self.hard_loss: loss})


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
        return self.ce_weight * ce + self.kd_weight * kd, _parts(ce=ce, kd=kd)


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
        return self.ce_weight * ce + ramp * dkd, _parts(ce=ce, dkd=dkd)


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
        return self.ce_weight * ce + self.kd_weight * dist, _parts(ce=ce, dist=dist)


def _require_features(context: MethodContext, method: str) -> None:
    if context.teacher_dim is None:
        raise UserError(f"method '{method}' needs teacher features: extract with --outputs logits,features")


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
        _require_features(context, "kdpp")
        if context.class_means is None:
            raise UserError(
                "method 'kdpp' needs the teacher's class means: compute them with `pipeline stats --store STORE --teacher ID`"
            )
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.warmup_epochs, self.ce_weight, self.hard_loss = warmup_epochs, ce_weight, hard_loss
        self.register_buffer("class_means", context.class_means.float())
        s, t = context.student_dim, context.teacher_dim
        self.project = (
            nn.Sequential(nn.BatchNorm1d(s), nn.Dropout(0.5), nn.Linear(s, t)) if s != t else nn.Identity()
        )

    def forward(self, student, teacher, targets):
        ce = hard_loss(self.hard_loss, student["logits"], targets)
        kd = kd_loss(student["logits"], teacher["logits"], self.temperature)
        embedding = self.project(student["features"])  # (B, D_t)
        nd = nd_loss(embedding, teacher["features"].norm(dim=1), self.class_means, targets.classes(teacher["logits"]))
        ramp = min(1.0, self.epoch / self.warmup_epochs) if self.warmup_epochs else 1.0
        return self.ce_weight * ce + self.alpha * ramp * kd + self.beta * nd, _parts(ce=ce, kd=kd, nd=nd)


@register_method("srd")
class SRD(Method):
    """The projector + BatchNorm + LogSum recipe (Miles & Mikolajczyk, 2024).

    Student feature -> Linear -> BatchNorm1d (no affine, eps 1e-4); teacher
    feature -> its own BatchNorm1d (no affine); L_rep = log of the sum of
    |difference|^4 over the batch; total = CE + rep_weight * L_rep + kd_weight * KL(T).
    """

    needs = ("logits", "features")
    student_needs = ("logits", "features")

    def __init__(self, context, rep_weight=2.0, exponent=4.0, kd_weight=1.0, temperature=1.0, ce_weight=1.0, hard_loss="ce"):
        super().__init__()
        _require_features(context, "srd")
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
        return total, _parts(ce=ce, kd=kd, rep=rep)
