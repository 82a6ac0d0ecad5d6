"""Flag groups that several commands share, and how each is read back: views, teacher weights, the device."""

from __future__ import annotations

import argparse

import torch

from stages.data.datasets import list_datasets
from stages.data.views import ViewRecipe
from stages.settings import build
from stages.teachers.extract_job import ExtractJob
from storage import UserError

from pipeline.settings import config
from pipeline.settings.recipe import VIEWS, load_recipe
from pipeline.settings.setting_flags import add_setting_flags, flag_type, settings_from_args


def data_help(what: str = "training data") -> str:
    """--data's help, naming the kinds of source the dataset registry holds."""
    return f"{what}: {', '.join(list_datasets())} (wds: tar shards, local or at a URL such as s3://bucket/train-{{0000..0099}}.tar)"


VAL_DATA_HELP = (
    "validation data of any kind, whatever --data is: folder:PATH, wds:PATTERN or hfds:PATH (a bare path is of --data's kind), "
    "its classes those of the training data (default: the own split of digits, fake and hfds; none for folders and shards)"
)

RAY_ADDRESS_HELP = (
    "Ray cluster to join, HOST:PORT, ray://HOST:PORT, or auto for the one `ray start` runs on this machine"
)


def view_flags(p: argparse.ArgumentParser) -> None:
    """One flag per view setting (``ViewRecipe``'s declarations), and the plan's seed."""
    g = p.add_argument_group("views (fixed when a store is created; an existing store keeps its own)")
    add_setting_flags(g, ViewRecipe)
    g.add_argument("--plan-seed", type=flag_type("plan_seed"), help="seed of the view plan (default: 0)")


def given_views(args) -> dict:
    """The view settings the command gave: its view flags over the ``views:`` section of --config (not checked)."""
    return config.merge(load_recipe(args.config).get(VIEWS) or {}, settings_from_args(args, ViewRecipe))


def view_recipe(args, base: ViewRecipe | None = None, given: dict | None = None) -> ViewRecipe:
    """View flags over the ``views:`` section of --config (``given``, when the caller has read them already) over
    ``base`` (a store's recipe, or the defaults)."""
    merged = config.merge((base or ViewRecipe()).to_dict(), given_views(args) if given is None else given)
    return build(ViewRecipe, merged, args.config or "view flags")


def teacher_flags(g) -> None:
    """A live teacher's weights (a file, or a seeded random start), declared as extraction's are (``ExtractJob``)."""
    add_setting_flags(g, ExtractJob, only=("weights", "random_init", "teacher_seed"), fill_defaults=True)


def local_device(flag: str | None) -> str:
    """--device, else cuda when a GPU is visible, else cpu."""
    device = flag or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but no CUDA GPU is visible here: use --device cpu")
    index = device.partition(":")[2]
    if device.startswith("cuda") and index and int(index) >= torch.cuda.device_count():
        raise UserError(
            f"--device {device}: this machine shows {torch.cuda.device_count()} CUDA GPU(s), numbered from 0"
        )
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but this machine has no Apple GPU: use --device cpu")
    return device


THREADS_HELP = (
    "torch's intra-op CPU threads in this process (default: OMP_NUM_THREADS when set, else the CPUs this process may use, "
    "by its affinity and cgroup quota, less its --workers loader processes, at least 1; torch's own default takes every core however busy; "
    "a Ray worker's: the CPUs Ray gives it)"
)
