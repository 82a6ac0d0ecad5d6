"""Distillation methods: each lives in its own module and registers itself by name (``@register_method``).

Importing the package imports every method module, as timm's ``models/__init__`` does for its model
files, so the registry is full whenever a method is looked up.

The registry:

* ``register_method(name)``: the class decorator that adds a ``Method`` subclass under ``name``.
* ``list_methods()``: the registered names, sorted.
* ``method_class(name)``: the class registered under ``name``; an unknown name is a ``storage.UserError`` that
  lists the known ones (and the close matches).
* ``create_method(name, context, **settings)``: the method built from a ``MethodContext`` (class count, widths
  and token shapes of student and teacher; ``method_context`` fills it from a built student) and its settings;
  settings its constructor does not take are a ``UserError``.
* ``parse_method(text)`` and ``build_method(...)``: a ``--method`` value, one method or a composite such as
  ``kd@beitv2_l+cospress@dinov2_s``, parsed into ``Methods`` (its ``Part`` s and what they read) and built into
  one method or a ``Composite``.

A method declares the teacher outputs it reads (``needs``) and the student outputs it uses (``student_needs``);
its ``forward(student_outputs, teacher_outputs, targets)`` returns the total loss and its named parts. The manual's
Methods page ("What a method declares, and what the loop calls") describes the hooks in the order the loop calls
them.

Example:
    >>> from stages.methods import list_methods, method_class
    >>> list_methods()
    ['ce', 'cospress', 'dist', 'dkd', 'gpd', 'kd', 'kdpp', 'srd']
    >>> method_class("kd").needs
    ('logits',)
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
from .composite import Composite, Methods, MethodSpec, Part, build_method, is_composite, parse_method

__all__ = [
    "Composite",
    "Method",
    "MethodContext",
    "MethodSpec",
    "Methods",
    "Part",
    "Targets",
    "build_method",
    "create_method",
    "hard_loss",
    "is_composite",
    "list_methods",
    "method_class",
    "method_context",
    "parse_method",
    "register_method",
]
