"""Command-line flags from the settings' one declaration, and the checks of the settings that exist as flags only.

A settings dataclass declares each field once (``stages.settings.setting``: default, check, help);
``add_setting_flags`` makes a flag of every field, with its parser, choices and help (the default
included), and ``settings_from_args`` reads back the ones the user gave. ``FLAGS`` declares the settings
that are no dataclass field (``--views``, ``--block``, ``--actors`` ...); ``cli`` gives each such flag its
check as argparse ``type=``. Either way ``--epochs 0`` and ``epochs: 0`` in a YAML file are refused in the
same words, before anything is written.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from stages.settings import (
    MAX_WORKERS,
    PROB,
    SEED,
    SIZE,
    WORKERS,
    Check,
    Device,
    Flag,
    Int,
    ListOf,
    Location,
    Mapping,
    Name,
    Optional,
    Seq,
    Float,
    Weights,
    declared,
    default_of,
)
from stages.data.views import ViewRecipe
from stages.teachers.extract_job import ExtractJob
from stages.training.settings import TrainSettings
from storage import UserError

from pipeline.settings import config

FLAGS = {  # command-line settings that are no dataclass field
    "workers": WORKERS,
    "threads": Int(1, MAX_WORKERS),
    "actors": Int(0, MAX_WORKERS),
    "ray_workers": Int(0, MAX_WORKERS),
    "gpus_per_worker": Float(0.0, 1024.0),
    "max_failures": Int(0, 10_000),
    "plan_seed": SEED,
    "teacher_size": SIZE,
    "device": Device(),
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
    "cpus_per_trial": Float(0.0, float(MAX_WORKERS), lo_open=True),
    "gpus_per_trial": Float(0.0, 1024.0),
    "max_concurrent": Int(0, MAX_WORKERS),
    "max_trials": Int(1, 1_000_000),
}


# Where a flag's check is looked up, first match wins: flags of their own, then the settings dataclasses.
_DECLARED = (FLAGS, declared(TrainSettings), declared(ViewRecipe), declared(ExtractJob))


def declaration(name: str) -> Check | None:
    """The check of setting ``name``: a flag of its own, else the training, view or extraction setting of that name
    (the demo's --epochs is the student's; `verify --workers` takes what every --workers does)."""
    return next((checks[name] for checks in _DECLARED if name in checks), None)


def flag_type(name: str, check: Check | None = None):
    """The argparse ``type=`` of flag ``--NAME``: parses and checks with the setting's one declaration."""
    check = check or declaration(name)
    if check is None:
        raise KeyError(f"no declaration for setting {name}")
    if isinstance(check, (Seq, ListOf)):  # nargs flags: each value alone here, the whole list in check_fields
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


def _flag_name(f, rename: dict) -> str:
    return rename.get(f.name) or f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _shown(f) -> str:
    if f.metadata.get("show_default"):
        return f.metadata["show_default"]
    value = default_of(f)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_setting_flags(
    group,
    cls,
    *,
    skip=(),
    rename: dict | None = None,
    helps: dict | None = None,
    choices: dict | None = None,
    known: dict | None = None,
    defaults: dict | None = None,
    only: tuple[str, ...] | None = None,
    fill_defaults: bool = False,
) -> None:
    """A flag for every declared field of ``cls`` not in ``skip``: ``--field-name`` (or ``rename``), parsed and
    checked by the field's declaration, help from it with the default appended (``helps`` replaces a help text).
    ``choices`` restricts a flag to some values; ``known`` lists in its help what a registry holds (a miss is then
    the registry's own line, with a close match). ``defaults``: a command's own defaults where they differ from the
    field's (`train` fits with ce), as help shows them. ``only``: just these fields. A field without a default is a
    required flag. Unset flags stay ``None``: they never override a recipe; ``fill_defaults`` gives them the field's
    default instead, for settings no recipe holds (a live teacher's weights)."""
    rename, helps, choices, known, defaults = rename or {}, helps or {}, choices or {}, known or {}, defaults or {}
    for f in fields(cls):
        if f.name in skip or "check" not in f.metadata or (only is not None and f.name not in only):
            continue
        check = f.metadata["check"]
        inner = check.inner if isinstance(check, Optional) else check
        text = helps.get(f.name, f.metadata["help"]) + (f": {', '.join(known[f.name])}" if f.name in known else "")
        required = default_of(f) is MISSING
        kwargs = {
            "dest": f.name,
            "default": default_of(f) if fill_defaults and not isinstance(inner, Mapping) else None,
            "required": required or None,
            "help": text if required else f"{text} (default: {defaults.get(f.name, _shown(f))})",
        }
        if isinstance(inner, Flag):
            kwargs["action"] = "store_true"
        elif isinstance(inner, Mapping):
            kwargs.update(action="append", metavar="KEY=VALUE", type=str)  # pairs, parsed by settings_from_args
        elif f.name in choices or hasattr(inner, "values"):
            kwargs["choices"] = choices.get(f.name) or inner.values
        elif isinstance(inner, Seq):
            kwargs.update(
                nargs=inner.n,
                type=flag_type(f.name, inner),
                metavar=("MIN", "MAX") if inner.ordered and inner.n == 2 else None,
            )
        elif isinstance(inner, ListOf):
            kwargs.update(nargs="+", type=flag_type(f.name, inner))
        else:
            kwargs.update(
                type=flag_type(f.name, check), metavar=_flag_name(f, rename).lstrip("-").replace("-", "_").upper()
            )
        group.add_argument(
            _flag_name(f, rename), **{k: v for k, v in kwargs.items() if v is not None or k == "default"}
        )


def settings_from_args(args: argparse.Namespace, cls, rename: dict | None = None) -> dict:
    """The declared fields of ``cls`` that the command line set, as settings (``KEY=VALUE`` pairs as a mapping)."""
    out = {}
    for f in fields(cls):
        value = getattr(args, f.name, None)
        if value is None or "check" not in f.metadata:
            continue
        if isinstance(f.metadata["check"], Mapping):
            value = config.parse_pairs(value, _flag_name(f, rename or {}))
        out[f.name] = value
    return out
