"""Several methods in one run, each reading its own teacher, their losses summed with a weight each.

A run's ``method`` is either one registered method (``kd``) or a composite of parts joined by ``+``, each
``METHOD[@TEACHER]``: ``kd@beitv2_l+cospress@dinov2_s`` trains one student on VanillaKD's logit loss from
the cached ``beitv2_l`` and CosPress's token loss from the cached ``dinov2_s``. A part without ``@TEACHER``
reads the run's teacher (``--teacher-id``, or the store's only one).

A part is named by its method, or by ``METHOD@TEACHER`` where the method appears twice; that name keys its
settings in ``method_args`` (``{cospress: {weight: 0.5, temperatures: [...]}}``, ``--method-arg
cospress.weight=0.5``), where ``weight`` (default 1) multiplies its loss, and names its loss in the epoch lines:
``train_cospress`` is the part's whole loss, ``train_cospress.local`` one of its terms. A recipe may also list
the parts (``as_spec``)::

    method:
      - {method: kd, teacher: beitv2_l, weight: 1.0, args: {hard_loss: bce}}
      - {method: cospress, teacher: dinov2_s}

A composite of one part at weight 1 trains bit for bit as its method alone.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from storage import UserError
from storage.names import check_name

from ..model_outputs import student_forward
from ..settings import NON_NEGATIVE, Check
from .base import Method, create_method, method_class, method_context
from .method_settings import check_method_args

PART_SEP, TEACHER_SEP = "+", "@"
WEIGHT = "weight"  # the one part setting that is not its method's: the factor of its loss


@dataclass(frozen=True)
class Part:
    method: str
    teacher: str | None  # a teacher id in the store (a model name with --online); None: the run's teacher
    name: str  # the part's key in method_args and in the epoch lines


def is_composite(spec: str) -> bool:
    """Whether ``spec`` is written as parts (``kd@a``, ``kd+dist``): a test of the text, not a parse."""
    return PART_SEP in spec or TEACHER_SEP in spec


@dataclass(frozen=True)
class Methods:
    """A run's ``method`` setting parsed (``parse_method``): its parts, and what they read.

    Made once per spec at the boundary (the setting's check) and read everywhere after, through
    ``TrainSettings.methods``: nothing past the check splits the text again."""

    spec: str
    parts: tuple[Part, ...]

    @property
    def composite(self) -> bool:
        return is_composite(self.spec)

    @property
    def needs(self) -> tuple[str, ...]:
        """The teacher outputs the method (every part of it) reads."""
        return tuple(dict.fromkeys(k for p in self.parts for k in method_class(p.method).needs))

    @property
    def needs_teacher(self) -> bool:
        """Whether the method cannot train without a teacher (some part reads one and cannot do without)."""
        return any(method_class(p.method).needs and method_class(p.method).requires_teacher for p in self.parts)

    def teachers(self) -> list[tuple[str, str | None, tuple]]:
        """(name, own teacher, teacher outputs read) of each part."""
        return [(p.name, p.teacher, method_class(p.method).needs) for p in self.parts]

    def part_args(self, method_args: dict, where: str) -> list[tuple[float, dict]]:
        """(weight, method settings) of each part, checked; a plain method's settings are ``method_args`` itself."""
        if not self.composite:
            check_method_args(method_class(self.spec), method_args, where)
            return [(1.0, dict(method_args))]
        names = [p.name for p in self.parts]
        stray = [k for k, v in method_args.items() if k not in names or not isinstance(v, dict)]
        if stray:
            raise UserError(
                f"method_args of the composite {self.spec} ({where}) are keyed by part, {', '.join(names)}: found "
                f"{', '.join(map(str, stray))} (e.g. --method-arg {names[-1]}.{WEIGHT}=0.5)"
            )
        out = []
        for part in self.parts:
            args = dict(method_args.get(part.name, {}))
            weight = args.pop(WEIGHT, 1.0)
            NON_NEGATIVE(weight, f"the weight of part {part.name} ({where})")
            check_method_args(method_class(part.method), args, f"part {part.name}, {where}")
            out.append((float(weight), args))
        if not any(w for w, _ in out):
            raise UserError(
                f"every part of {self.spec} has weight 0 ({where}): the run would learn nothing; give a part a weight above 0"
            )
        return out


def parse_method(spec: str) -> Methods:
    """``"kd@a+cospress@b"`` as its parts; a plain method is one part with no teacher of its own."""
    if not isinstance(spec, str) or not spec:
        raise UserError(f"method must be a method name or parts such as kd@TEACHER+cospress@TEACHER, not {spec!r}")
    return _parsed(spec)


@functools.lru_cache(maxsize=256)  # each spec is parsed once; a registry never changes what a name it holds means
def _parsed(spec: str) -> Methods:
    pairs = []
    for text in spec.split(PART_SEP):
        method, sep, teacher = text.strip().partition(TEACHER_SEP)
        method_class(method)  # an unknown method names the known ones
        if sep:
            check_name(teacher, f"the teacher of part '{text}' in method {spec}")
        pairs.append((method, teacher or None))
    if len(set(pairs)) < len(pairs):
        twice = next(p for p in pairs if pairs.count(p) > 1)
        raise UserError(
            f"method {spec} has part {twice[0]}{TEACHER_SEP + twice[1] if twice[1] else ''} twice: one part per method and teacher "
            "(give a part more weight with --method-arg PART.weight=W)"
        )
    methods = [m for m, _ in pairs]
    parts = [Part(m, t, m if methods.count(m) == 1 else f"{m}{TEACHER_SEP}{t or ''}") for m, t in pairs]
    return Methods(spec, tuple(parts))


class MethodSpec(Check):
    """The ``method`` setting: a registered method, or a composite of them (``kd@a+cospress@b``)."""

    what = "a method name, or parts METHOD@TEACHER joined by +"

    def check(self, value):
        if not isinstance(value, str):
            raise TypeError
        parse_method(value)  # an unknown method or a bad part explains itself
        return value


def as_spec(method, method_args: dict | None, where: str) -> tuple:
    """A recipe's list of parts (``[{method, teacher, weight, args}]``) as the ``method`` string and the nested
    ``method_args`` every run resolves from; any other ``method`` value passes through unchanged."""
    if not isinstance(method, list):
        return method, method_args
    words, args = [], {}
    for i, part in enumerate(method):
        _check_part(i, part, where)
        words.append(part["method"] + (f"{TEACHER_SEP}{part['teacher']}" if part.get("teacher") else ""))
    parts = parse_method(PART_SEP.join(words)).parts
    for part, given in zip(parts, method):
        own = dict(given.get("args") or {})
        if WEIGHT in given and WEIGHT in own:
            raise UserError(
                f"{where}: part {part.name} gives its weight twice (weight: {given[WEIGHT]} and args: weight: {own[WEIGHT]}): keep one"
            )
        if WEIGHT in given:
            own[WEIGHT] = given[WEIGHT]
        if own:
            args[part.name] = own
    return PART_SEP.join(words), {**(method_args or {}), **args}


def _check_part(i: int, part, where: str) -> None:
    """Part ``i`` of a recipe's list of parts: a mapping of method, teacher, weight and args, each of its type."""
    if not isinstance(part, dict) or not isinstance(part.get("method"), str):
        raise UserError(
            f"{where}: part {i + 1} of method must be a mapping with method: NAME (and teacher:, weight:, args:), not {part!r}"
        )
    unknown = sorted(set(part) - {"method", "teacher", WEIGHT, "args"})
    if unknown:
        raise UserError(
            f"{where}: part {i + 1} of method has no key {', '.join(unknown)}: a part has method, teacher, weight and args"
        )
    if part.get("teacher") is not None and not isinstance(part["teacher"], str):
        raise UserError(
            f"{where}: the teacher of part {i + 1} of method must be a teacher id (a string), not {part['teacher']!r}"
        )
    if not isinstance(part.get("args") or {}, dict):
        raise UserError(
            f"{where}: the args of part {i + 1} of method must be a mapping of its method's settings (KEY: VALUE), not {part['args']!r}"
        )


def build_method(
    methods: Methods,
    method_args: dict,
    model: nn.Module,
    teacher,
    *,
    num_classes: int,
    size: int,
    epochs: int,
    student_trained: bool = False,
) -> Method:
    """The run's method for student ``model``: one registered method, or a ``Composite`` whose part i sees
    ``teacher.part(i)`` (a ``PartsTeacher``) as its teacher."""
    if not methods.composite:
        context = method_context(
            method_class(methods.spec),
            model,
            teacher,
            num_classes=num_classes,
            size=size,
            epochs=epochs,
            student_trained=student_trained,
        )
        return create_method(methods.spec, context, **method_args)
    parts, settings = methods.parts, methods.part_args(method_args, "the run")
    built = []
    for i, (part, (_, args)) in enumerate(zip(parts, settings)):
        source = None if teacher is None else teacher.part(i)
        context = method_context(
            method_class(part.method),
            model,
            source,
            num_classes=num_classes,
            size=size,
            epochs=epochs,
            student_trained=student_trained,
        )
        built.append(create_method(part.method, context, **args))
    return Composite(parts, [w for w, _ in settings], built)


class Composite(Method):
    """Parts' losses summed with their weights; each part's outputs, its teacher's and the student's as it reads
    them, arrive under its index (``"0:logits"``).

    The student's forward runs once for all parts. A part that trains a module in the student's place (GPD's
    widened network) gives every part its outputs, so it combines only with parts that read the student's logits.
    """

    def __init__(self, parts: list[Part], weights: list[float], methods: list[Method]):
        super().__init__()
        self.part_names, self.weights = [p.name for p in parts], weights
        self.parts = nn.ModuleList(methods)
        self.needs = tuple(dict.fromkeys(k for m in methods for k in m.needs))
        self.student_needs = tuple(dict.fromkeys(k for m in methods for k in m.student_needs))
        wrapping = [i for i, m in enumerate(methods) if type(m).wrap_student is not Method.wrap_student]
        if len(wrapping) > 1:
            raise UserError(
                f"parts {', '.join(self.part_names[i] for i in wrapping)} each train their own network around the student: keep one"
            )
        self.wrapper = methods[wrapping[0]] if wrapping else None
        if self.wrapper is not None and set(self.student_needs) - {"logits"}:
            raise UserError(
                f"part {self.part_names[wrapping[0]]} trains a widened network around the student, so the other parts can read only the "
                f"student's logits, not its {', '.join(sorted(set(self.student_needs) - {'logits'}))}: combine it with kd, dkd or dist"
            )

    @property
    def teacher_temperature(self) -> tuple[float, ...]:
        return tuple(m.teacher_temperature for m in self.parts)

    @property
    def epoch(self) -> int:
        return self.parts[0].epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        for m in self.parts:
            m.epoch = value

    def wrap_student(self, model):
        return model if self.wrapper is None else self.wrapper.wrap_student(model)

    def student_outputs(self, model, x):
        """One forward of the student for every part; part i's outputs, as its method reads them, under ``"i:"``."""
        out = (
            student_forward(model, x, self.student_needs)
            if self.wrapper is None
            else self.wrapper.student_outputs(model, x)
        )
        return {
            f"{i}:{k}": v
            for i, m in enumerate(self.parts)
            for k, v in (out if m is self.wrapper else m.adapt_outputs(model, out)).items()
        }

    def export_student(self, model):
        return model if self.wrapper is None else self.wrapper.export_student(model)

    def forward(self, student, teacher, targets):
        total, logged = None, {}
        for i, (name, weight, method) in enumerate(zip(self.part_names, self.weights, self.parts)):
            loss, terms = method(split_outputs(student, i), split_outputs(teacher, i), targets)
            term = weight * loss  # x 1.0 is exact: one part at weight 1 is its method's loss, bit for bit
            total = term if total is None else total + term
            logged[name] = loss.detach()
            logged.update({f"{name}.{k}": v for k, v in terms.items()})
        return total, logged


def split_outputs(outputs: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Part ``index``'s outputs (the student's or its teacher's) from a composite's flat dict."""
    prefix = f"{index}:"
    return {k[len(prefix) :]: v for k, v in outputs.items() if k.startswith(prefix)}
