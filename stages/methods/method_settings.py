"""Every method setting's type and range, declared once by name: a name means one thing in every method.

A method's settings are its constructor's keyword arguments (their defaults are the paper's); ``METHOD``
gives each name its check, and ``check_method_args`` holds ``--method-arg`` / ``method_args:`` against the
method's constructor and these checks at set-up, before anything is written.
"""

from __future__ import annotations

import inspect
import numbers

from ..settings import NON_NEGATIVE, POSITIVE, Check, Choice, Flag, Float, Int, ListOf, Optional, Text
from storage import UserError

TEMPERATURE = Float(1e-3, 1000.0)  # below 1e-3 a softmax of logits in the tens is 0 and 1 in float32, and KL turns NaN
METHOD = {  # the registered methods' settings (constructor arguments), by name: a name means one thing in every method
    "temperature": TEMPERATURE,
    "tau": TEMPERATURE,  # DIST's temperature
    "temperatures": ListOf(TEMPERATURE),  # CosPress's similarity temperatures
    "alpha": NON_NEGATIVE,  # DKD's target-class weight; KD++'s KD weight
    "beta": NON_NEGATIVE,  # DKD's non-target weight; DIST's inter-class weight; KD++'s ND weight
    "gamma": NON_NEGATIVE,  # DIST's intra-class weight
    **dict.fromkeys(
        (
            "ce_weight",
            "kd_weight",
            "rep_weight",
            "local_weight",
            "global_weight",
            "token_weight",
            "cls_weight",
            "probe_weight",
        ),
        NON_NEGATIVE,
    ),
    "warmup_epochs": NON_NEGATIVE,  # epochs over which a loss weight ramps up
    "exponent": POSITIVE,  # SRD's LogSum exponent
    "smoothing": Float(0.0, 1.0, hi_open=True),  # GPD's SCE smoothing
    "ratio": Int(2, 8),  # GPD's widening: r^2 the student's cost per step
    "noise": NON_NEGATIVE,  # GPD's N(0, noise) on widened weights
    "orepa": Flag(),  # GPD's channel-branch reparameterization of 3x3 stride-1 convs
    # its branch initialisation; None: single when the student starts from weights
    "orepa_init": Optional(Choice(("official", "single"))),
    "hard_loss": Choice(("ce", "bce")),
}


def check_method_args(method_cls, args: dict, where: str) -> None:
    """Method settings against the method's constructor: known names, and each value against its declaration in
    ``METHOD`` (else of the kind its default has)."""
    params = list(inspect.signature(method_cls.__init__).parameters.values())[2:]  # after (self, context)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    known = {
        p.name: p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    name = getattr(method_cls, "name", method_cls.__name__)
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise UserError(
            f"method '{name}' has no setting {', '.join(unknown)} ({where}): its settings are {', '.join(known) or 'none'}"
        )
    for key, value in args.items():
        check = METHOD.get(key) or _like(known[key].default)
        if check is not None:
            check(value, f"method '{name}' setting {key} ({where})")


def _like(default) -> Check | None:
    """A check for values of the kind ``default`` is; None where the default says nothing (None, no default)."""
    if isinstance(default, bool):
        return Flag()
    if isinstance(default, numbers.Real):
        return Float()
    if isinstance(default, str):
        return Text()
    if isinstance(default, (list, tuple)):
        return ListOf(Check())
    return None
