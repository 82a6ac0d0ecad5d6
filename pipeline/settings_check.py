"""Every setting's type and range, declared once, checked at set-up for flags and YAML alike.

A ``Check`` turns a value into the setting's value or says what it should
have been. The tables below declare them: ``TRAIN`` the fields of
``TrainSettings``, ``VIEWS`` those of ``ViewRecipe`` (``config.build`` checks
every field of a dict merged from recipes, ``--config`` files and flags), and
``FLAGS`` the settings that exist on the command line only. ``flag(name)`` is
the argparse ``type=`` of a flag, so ``--epochs 0`` and ``epochs: 0`` in a
YAML file are refused in the same words, before anything is written.

Method settings (``--method-arg``, ``method_args:``) are checked against the
method class's constructor and ``METHOD`` (``check_method_args``); timm model arguments
(``--student-arg``, ``--model-arg``) against timm's builder, which raises
``TypeError`` when the student is built, before a run writes any file.
"""

from __future__ import annotations

import argparse
import inspect
import math
import numbers
import re
from dataclasses import dataclass, fields

from storage import UserError
from storage.location import check_url
from storage.names import check_name

# Sanity bounds: larger values are typing mistakes, not settings (a 4096 px float32 batch of 64 views is 12 GiB).
MAX_SIZE = 4096  # px of a rendered view
MAX_BATCH = 65536
MAX_BLOCK = 1 << 20  # samples per shard
MAX_VIEWS = 100_000
MAX_WORKERS = 1024  # processes, actors
MAX_SEED = 2**63 - 1  # torch.manual_seed and numpy's SeedSequence both take it
MAX_BATCH_BYTES = 16 << 30  # one batch's float32 input: 1024 views at 224 px is 0.6 GiB


class Check:
    """One setting's type and range. ``what`` says in words what a valid value is."""

    what = "a value"

    def parse(self, text: str):
        """The value a command-line string stands for."""
        return text

    def check(self, value):
        """``value`` as the setting holds it; ``ValueError`` or ``TypeError`` when it is not valid."""
        return value

    def __call__(self, value, name: str):
        try:
            return self.check(value)
        except (ValueError, TypeError):
            raise UserError(f"{name} must be {self.what}, not {_show(value)}") from None


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    def num(v) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {num(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {num(hi)}"
    return ""


@dataclass(frozen=True)
class Int(Check):
    lo: int | None = None
    hi: int | None = None

    @property
    def what(self) -> str:
        return f"an integer {_range(self.lo, self.hi)}".rstrip()

    def parse(self, text):
        return int(text)

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            raise ValueError
        return int(value)


@dataclass(frozen=True)
class Float(Check):
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    @property
    def what(self) -> str:
        return f"a number {_range(self.lo, self.hi, self.lo_open, self.hi_open)}".rstrip()

    def parse(self, text):
        return float(text)

    def check(self, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise TypeError
        lo, hi = self.lo, self.hi
        if lo is not None and (value < lo or (self.lo_open and value == lo)):
            raise ValueError
        if hi is not None and (value > hi or (self.hi_open and value == hi)):
            raise ValueError
        return float(value)


PROB = Float(0.0, 1.0)
POSITIVE = Float(0.0, None, lo_open=True)
NON_NEGATIVE = Float(0.0)


@dataclass(frozen=True)
class Seq(Check):
    """``n`` values of one kind (a list in YAML, ``nargs`` on the command line); ``ordered``: a (min, max) pair."""

    item: Check
    n: int = 2
    ordered: bool = True

    @property
    def what(self) -> str:
        kind = "a (min, max) pair with min <= max" if self.ordered and self.n == 2 else f"{self.n} values"
        return f"{kind}, each {self.item.what}"

    def check(self, value):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or len(value) != self.n:
            raise TypeError
        out = tuple(self.item.check(v) for v in value)
        if self.ordered and list(out) != sorted(out):
            raise ValueError
        return out


@dataclass(frozen=True)
class ListOf(Check):
    item: Check

    @property
    def what(self) -> str:
        return f"a list, each item {self.item.what}"

    def check(self, value):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [self.item.check(v) for v in value]


@dataclass(frozen=True)
class Choice(Check):
    values: tuple

    @property
    def what(self) -> str:
        return "one of " + ", ".join(map(str, self.values))

    def check(self, value):
        if value not in self.values:
            raise ValueError
        return value


@dataclass(frozen=True)
class Optional(Check):
    """``None`` (the component's own default), or a value ``inner`` accepts."""

    inner: Check

    @property
    def what(self) -> str:
        return self.inner.what

    def parse(self, text):
        return self.inner.parse(text)

    def check(self, value):
        return None if value is None else self.inner.check(value)


class Text(Check):
    what = "a non-empty string"

    def check(self, value):
        if not isinstance(value, str) or not value.strip():
            raise TypeError
        return value


class Flag(Check):
    what = "true or false"

    def check(self, value):
        if not isinstance(value, bool):
            raise TypeError
        return value


class Mapping(Check):
    what = "a mapping of settings (KEY: VALUE)"

    def check(self, value):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise TypeError
        return value


class Jitter(Check):
    what = "one number >= 0, or 3 or 4 of them (brightness, contrast, saturation[, hue <= 0.5])"

    def check(self, value):
        if isinstance(value, (list, tuple)):
            values = [NON_NEGATIVE.check(v) for v in value]
            if len(values) not in (3, 4) or (len(values) == 4 and values[3] > 0.5):
                raise ValueError
            return tuple(values)
        return NON_NEGATIVE.check(value)


class Weights(Check):
    """Comma-separated weights of averaged teachers (``0.7,0.3``), kept as written."""

    what = "positive numbers separated by commas, e.g. 0.7,0.3"

    def check(self, value):
        if not isinstance(value, str):
            raise TypeError
        for part in value.split(","):
            POSITIVE.check(float(part))
        return value


class Name(Check):
    """A plain name that becomes a path or an object key: a teacher id, a method."""

    what = "a plain name (letters, digits, '_', '-', '.'; no '/' or '..')"

    def check(self, value):
        if not isinstance(value, str):
            raise TypeError
        try:
            return check_name(value)
        except UserError:
            raise ValueError from None


class Device(Check):
    what = "cpu, cuda, cuda:N or mps"

    def check(self, value):
        if not isinstance(value, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", value):
            raise ValueError
        return value


class Location(Check):
    """A store or checkpoint location: a path, or a URL of a known scheme whose file system is installed."""

    what = "a directory or a URL such as s3://bucket/path"

    def check(self, value):
        if not isinstance(value, str) or not value.strip():
            raise TypeError
        return check_url(value)  # a UserError in its own words: which schemes exist, which package is missing


SEED = Int(0, MAX_SEED)
SIZE = Int(1, MAX_SIZE)
WORKERS = Int(0, MAX_WORKERS)

# -- the declarations ----------------------------------------------------------------------

TRAIN = {  # stages.distill.TrainSettings
    "student": Text(),
    "student_kwargs": Mapping(),
    "size": Optional(SIZE),
    "method": Name(),
    "method_args": Mapping(),
    "epochs": Int(1, 100_000),
    "batch_size": Int(1, MAX_BATCH),
    "global_batch": Optional(Int(1, MAX_BATCH * MAX_WORKERS)),
    "repeats": Int(1, 1000),
    "optimizer": Text(),
    "momentum": PROB,
    "nesterov": Flag(),
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "schedule": Choice(("cosine", "step")),
    "lr_milestones": ListOf(Int(0)),
    "lr_gamma": POSITIVE,
    "warmup_epochs": NON_NEGATIVE,
    "label_smoothing": Float(0.0, 1.0, hi_open=True),
    "drop_path": Optional(Float(0.0, 1.0, hi_open=True)),
    "seed": SEED,
    "label_fraction": PROB,
    "label_seed": SEED,
    "window_rows": Int(1),
    "loader_workers": WORKERS,
    "verify": Choice(("all", "sample", "none")),
    "amp": Optional(Choice(("bf16", "fp16"))),
    "channels_last": Flag(),
    "clip_grad": Optional(POSITIVE),
    "model_ema": Optional(Float(0.0, 1.0, lo_open=True, hi_open=True)),
    "compile": Flag(),
}

VIEWS = {  # stages.views.ViewRecipe
    "scale": Seq(Float(0.0, 1.0, lo_open=True)),
    "ratio": Seq(POSITIVE),
    "hflip": PROB,
    "eval_crop": Float(0.0, 1.0, lo_open=True),
    "eval_interpolation": Choice(("bilinear", "bicubic")),
    "randaugment": Optional(Text()),
    "ra_interpolation": Choice(("random", "bilinear", "bicubic")),
    "color_jitter": Optional(Jitter()),
    "erase_prob": PROB,
    "erase_area": Seq(Float(0.0, 1.0, lo_open=True, hi_open=True)),
    "erase_aspect": Seq(POSITIVE),
    "mixup_alpha": NON_NEGATIVE,
    "cutmix_alpha": NON_NEGATIVE,
    "mix_prob": PROB,
    "mix_switch_prob": PROB,
    "fill": Seq(Int(0, 255), n=3, ordered=False),
}

FLAGS = {  # command-line settings that are no dataclass field (a flag of the same name as a field shares its check)
    "views": Int(1, MAX_VIEWS),
    "block": Int(1, MAX_BLOCK),
    "topk": Int(1, 1 << 20),
    "workers": WORKERS,
    "actors": Int(0, MAX_WORKERS),
    "gpus_per_worker": Float(0.0, 1024.0),
    "max_failures": Int(0, 10_000),
    "teacher_seed": SEED,
    "plan_seed": SEED,
    "teacher_size": SIZE,
    "device": Device(),
    "store": Location(),
    "from_cache": Location(),
    "checkpoints": Location(),
    "teacher_id": Name(),
    "teacher_weights": Weights(),
    "replay": PROB,
    "units": Int(1, 1_000_000),
    "grid_samples": Int(1, 1024),
    "grid_views": Int(1, 1024),
    "seeds": Int(1, 1000),
    "teacher_epochs": Int(1, 100_000),
}

TEMPERATURE = Float(0.0, 1000.0, lo_open=True)
METHOD = {  # the registered methods' settings (constructor arguments), by name: a name means one thing in every method
    "temperature": TEMPERATURE,
    "tau": TEMPERATURE,  # DIST's temperature
    "temperatures": ListOf(TEMPERATURE),  # CosPress's similarity temperatures
    "alpha": NON_NEGATIVE,  # DKD's target-class weight; KD++'s KD weight
    "beta": NON_NEGATIVE,  # DKD's non-target weight; DIST's inter-class weight; KD++'s ND weight
    "gamma": NON_NEGATIVE,  # DIST's intra-class weight
    **dict.fromkeys(("ce_weight", "kd_weight", "rep_weight", "local_weight", "global_weight", "token_weight", "cls_weight", "probe_weight"), NON_NEGATIVE),
    "warmup_epochs": NON_NEGATIVE,  # epochs over which a loss weight ramps up
    "exponent": POSITIVE,  # SRD's LogSum exponent
    "smoothing": Float(0.0, 1.0, hi_open=True),  # GPD's SCE smoothing
    "ratio": Int(2, 8),  # GPD's widening: r^2 the student's cost per step
    "noise": NON_NEGATIVE,  # GPD's N(0, noise) on widened weights
    "hard_loss": Choice(("ce", "bce")),
}


def declared(cls) -> dict[str, Check]:
    """The declaration of a settings dataclass's fields (TrainSettings, ViewRecipe); empty for others."""
    return {"TrainSettings": TRAIN, "ViewRecipe": VIEWS}.get(cls.__name__, {})


def check_fields(cls, values: dict, where: str) -> dict:
    """``values`` for dataclass ``cls``, each field checked against its declaration; unknown keys name the known ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)} in {where}: known are {', '.join(sorted(names))}")
    checks = declared(cls)
    return {k: checks[k](v, f"{k} in {where}") if k in checks else v for k, v in values.items()}


def flag(name: str, check: Check | None = None):
    """The argparse ``type=`` of flag ``--NAME``: parses and checks with the setting's one declaration."""
    check = check or FLAGS.get(name) or TRAIN.get(name) or VIEWS.get(name)
    if check is None:
        raise KeyError(f"no declaration for setting {name}")
    if isinstance(check, Seq):  # nargs=2 flags: each value alone here, the pair's order in check_fields
        check = check.item

    def parse(text: str):
        try:
            value = check.parse(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"must be {check.what}, not {text!r}") from None
        try:
            return check.check(value)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"must be {check.what}, not {text}") from None
        except UserError as e:  # a check that explains itself (a location)
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def check_batch_bytes(batch: int, size: int, where: str) -> None:
    """Batch and size are each in range on their own; together they can still ask for more memory than any device has."""
    nbytes = batch * 3 * size * size * 4
    if nbytes > MAX_BATCH_BYTES:
        raise UserError(
            f"a batch of {batch:,} views at {size} px is {nbytes / 2**30:,.0f} GiB of float32 input before any activation "
            f"({where}), over the {MAX_BATCH_BYTES >> 30} GiB this tool allows: lower --batch-size or --size"
        )


def check_method_args(method_cls, args: dict, where: str) -> None:
    """Method settings against the method's constructor: known names, and each value against its declaration in
    ``METHOD`` (else of the kind its default has)."""
    params = list(inspect.signature(method_cls.__init__).parameters.values())[2:]  # after (self, context)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    known = {p.name: p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
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
