"""Settings declared once: a dataclass field carries its default, its check (type and range) and its help.

``setting(default, check, help)`` declares a field of a settings dataclass
(``TrainSettings``, ``ViewRecipe``). Everything else is derived from that one
declaration: ``check_fields`` checks a dict of values from YAML or flags in the
same words, ``build`` makes the dataclass, and ``pipeline.settings.setting_flags`` turns
the fields into command-line flags with their help and default. A ``Check``
turns a value into the setting's value or says what it should have been, so
``--epochs 0`` and ``epochs: 0`` in a YAML file are refused alike, before
anything is written.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import MISSING, dataclass, field, fields

from storage import UserError
from storage.file_systems import check_url
from storage.names import check_name
from storage.store_record import MAX_SEED

# Sanity bounds: larger values are typing mistakes, not settings (a 4096 px float32 batch of 64 views is 12 GiB).
MAX_SIZE = 4096  # px of a rendered view
MAX_BATCH = 65536
MAX_BLOCK = 1 << 20  # samples per shard
MAX_VIEWS = 100_000
MAX_WORKERS = 1024  # processes, actors
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
        except UserError as e:  # a check that explains itself (an unknown method names the known ones), after where
            raise UserError(f"{name}: {e}") from None


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


class ModelArgs(Mapping):
    """Extra ``timm.create_model`` arguments; the class count and the weights are the run's, never an argument."""

    what = "timm.create_model arguments (KEY: VALUE) other than num_classes, pretrained and checkpoint_path, which the run sets"

    def check(self, value):
        value = super().check(value)
        if {"num_classes", "pretrained", "pretrained_cfg_overlay", "checkpoint_path"} & set(value):
            raise ValueError
        return value


class Jitter(Check):
    what = "one number >= 0, or 3 or 4 of them (brightness, contrast, saturation[, hue <= 0.5])"

    def parse(self, text):
        return [float(v) for v in text.split(",")] if "," in text else float(text)  # --color-jitter 0.4 or 0.4,0.4,0.4

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


# -- declaring a field ---------------------------------------------------------------------------


def setting(
    default, check: Check, help: str, *, flag: str | None = None, factory=None, show_default: str | None = None
):
    """A dataclass field declared with its check and help text.

    ``flag``: the command-line flag when it is not ``--<field-name>`` (``--student-arg`` for a
    mapping); ``factory``: for mutable defaults; ``show_default``: the words help uses for the default.
    """
    meta = {"check": check, "help": help, "flag": flag, "show_default": show_default}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def declared(cls) -> dict[str, Check]:
    """Each field's check, for a dataclass whose fields are declared with ``setting``."""
    return {f.name: f.metadata["check"] for f in fields(cls) if "check" in f.metadata}


def default_of(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def check_fields(cls, values: dict, where: str) -> dict:
    """``values`` for dataclass ``cls``, each checked against its declaration; unknown keys name the known ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(unknown)} in {where}: known are {', '.join(sorted(names))}")
    checks = declared(cls)
    return {k: checks[k](v, f"{k} in {where}") if k in checks else v for k, v in values.items()}


def build(cls, values: dict, where: str):
    """The dataclass ``cls`` from a dict of settings (YAML, flags), every value checked; ``where`` names their source."""
    return cls(**check_fields(cls, values, where))


def check_batch_bytes(batch: int, size: int, where: str) -> None:
    """Batch and size are each in range on their own; together they can still ask for more memory than any device has."""
    nbytes = batch * 3 * size * size * 4
    if nbytes > MAX_BATCH_BYTES:
        raise UserError(
            f"a batch of {batch:,} views at {size} px is {nbytes / 2**30:,.0f} GiB of float32 input before any activation "
            f"({where}), over the {MAX_BATCH_BYTES >> 30} GiB this tool allows: lower --batch-size or --size"
        )
