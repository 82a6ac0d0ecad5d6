"""Distillation methods: each lives in its own module and registers itself by name (``@register_method``).

Importing the package imports every method module, as timm's ``models/__init__`` does for its model
files, so the registry is full whenever a method is looked up.
"""

from .base import (
    Method,
    MethodContext,
    Targets,
    create_method,
    hard_loss,
    list_methods,
    method_class,
    method_context,
    register_method,
)
from . import ce, cospress, dist, dkd, gpd, kd, kdpp, srd  # noqa: F401  (each registers its method)
from .composite import (
    Composite,
    MethodSpec,
    Part,
    build_method,
    is_composite,
    method_needs,
    needs_teacher,
    parse_method,
    part_args,
)

__all__ = [
    "Composite",
    "Method",
    "MethodContext",
    "MethodSpec",
    "Part",
    "Targets",
    "build_method",
    "create_method",
    "hard_loss",
    "is_composite",
    "list_methods",
    "method_class",
    "method_context",
    "method_needs",
    "needs_teacher",
    "parse_method",
    "part_args",
    "register_method",
]
