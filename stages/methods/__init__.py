"""Distillation methods: each lives in its own module and registers itself by name (``@register_method``).

Importing the package imports every method module, as timm's ``models/__init__`` does for its model
files, so the registry is full whenever a method is looked up.
"""

from .base import Method, MethodContext, Targets, create_method, hard_loss, list_methods, method_class, method_context, register_method
from . import ce, cospress, dist, dkd, gpd, kd, kdpp, srd  # noqa: F401  (each registers its method)

__all__ = ["Method", "MethodContext", "Targets", "create_method", "hard_loss", "list_methods", "method_class", "method_context", "register_method"]
