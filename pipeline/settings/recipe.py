"""A recipe (``--config``): its settings resolved with the flags into ``TrainSettings``, and checked whole.

A recipe in configs/ is shared by the commands of one experiment: extract and prepare read its ``views:`` (and
``size``), train and distill the rest. Every command that reads one checks all of it, so a wrong value anywhere
in the file (``views: 3``, ``epochs: abc``, a part's ``args: 5``) is refused by whichever command meets it first,
in one line naming the file and the key, not read as something else or ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from stages.data.views import ViewRecipe
from stages.methods import is_composite, parse_method
from stages.methods.composite import as_spec
from stages.settings import build, check_fields
from stages.training.distill import check_batch, resolve_batch
from stages.training.settings import TrainSettings
from storage import UserError

from pipeline.settings import config

log = logging.getLogger("pipeline")

VIEWS = "views"  # the recipe's section for the store's view plan


def load_recipe(path: str | Path | None) -> dict:
    """The recipe at ``path`` ({} for none), every value checked: the views as ``ViewRecipe``, the rest as distill reads it."""
    if not path:
        return {}
    file = config.load_yaml(path)
    check_views(file.get(VIEWS), str(path))
    train_settings(file, {}, str(path))
    return file


def check_views(views, where: str) -> ViewRecipe:
    """A recipe's ``views:`` section (None: the defaults) as the ``ViewRecipe`` it describes, every value checked."""
    if not isinstance(views or {}, dict):
        raise UserError(
            f"{VIEWS} in {where} must be a mapping of view settings (scale: [0.08, 1.0], hflip: 0.5, ...), not {views!r}"
        )
    return build(ViewRecipe, views or {}, f"{VIEWS} in {where}")


def train_settings(file: dict, flags: dict, where: str, ray_workers: int = 0) -> TrainSettings:
    """Defaults < a recipe or sweep file's settings < flags, every value checked; batch sizes resolved for ``ray_workers``."""
    file = {k: v for k, v in file.items() if k != VIEWS}  # a recipe's view section is for the store (extract, train)
    # each value, before a flag hides it
    check_fields(TrainSettings, {k: v for k, v in file.items() if k != "method"}, where)
    if "method" in file:  # a recipe's list of parts, as the method string and method_args of the flags
        file["method"], file["method_args"] = as_spec(file["method"], file.get("method_args"), where)
    file = _recipe_method_args(file, flags.get("method"), where)
    merged = config.merge(file, flags)
    settings = build(TrainSettings, merged, where)
    settings = with_batch(settings, merged, flags.get("batch_size"), ray_workers, where)
    settings = with_lr(settings, file, flags, where)
    settings.methods.part_args(settings.method_args, f"--method-arg or method_args in {where}")
    check_batch(settings, where, size=settings.size)  # the rest once the store and the workers are known
    return settings


def _recipe_method_args(file: dict, method: str | None, where: str) -> dict:
    """A paper recipe run with another ``--method``: its optimisation and views still apply, and its method's settings
    go to that method where the flag's composite has it as a part (A2's kd settings to the kd of kd@a+cospress@b)."""
    recipe_method = file.get("method")
    if not method or recipe_method in (None, method):
        return file
    args = file.pop("method_args", None) or {}
    part = (
        next((p.name for p in parse_method(method).parts if p.method == recipe_method), None)
        if is_composite(method) and not is_composite(recipe_method)
        else None
    )
    if part and args:
        log.info("%s sets method_args for %s: they apply to part %s of %s", where, recipe_method, part, method)
        return {**file, "method_args": {part: args}}
    if args:
        log.info("%s sets method_args for %s; %s starts from its own defaults", where, recipe_method, method)
    return file


def with_batch(settings: TrainSettings, merged: dict, flag: int | None, workers: int, where: str) -> TrainSettings:
    """``settings`` with both batch sizes resolved for ``workers`` Ray Train workers (0: one process, the whole batch).

    --batch-size is per worker (timm's meaning) and wins; a recipe's ``global_batch`` (the paper's, over all its
    GPUs) is split over the workers, which must divide it; a recipe may state ``batch_size`` (per worker) instead.
    """
    per_worker = flag
    if flag is None and "global_batch" in merged:
        if "batch_size" in merged and merged["batch_size"] * max(1, workers) != merged["global_batch"]:
            raise UserError(
                f"{where} states both batch_size {merged['batch_size']} (per worker) and global_batch {merged['global_batch']} "
                f"(over {max(1, workers)} worker(s)): keep one"
            )
    elif flag is None:
        per_worker = settings.batch_size
    batch, total = resolve_batch(per_worker, settings.global_batch, workers, where)
    return dataclasses.replace(settings, batch_size=batch, global_batch=total)


def with_lr(settings: TrainSettings, file: dict, flags: dict, where: str) -> TrainSettings:
    """``settings`` with the learning rate the run uses: --lr as given, or timm's rule when ``lr_base`` is set (the
    rate at ``lr_base_size`` scaled to the run's global batch, linearly or by its square root). Of ``lr`` and
    ``lr_base``, the one from the higher layer wins (flags over the file); both in one layer is refused."""
    layer = {
        key: "flags" if flags.get(key) is not None else "file" if file.get(key) is not None else None
        for key in ("lr", "lr_base")
    }
    if layer["lr"] is not None and layer["lr"] == layer["lr_base"]:
        words = "--lr and --lr-base" if layer["lr"] == "flags" else f"lr and lr_base in {where}"
        raise UserError(
            f"{words} both set the learning rate: keep one (lr_base scales with the global batch, lr does not)"
        )
    if layer["lr_base"] is None or layer["lr"] == "flags":
        if layer["lr"] == "file" and file.get("global_batch") not in (None, settings.global_batch):
            log.warning(
                "%s's lr %g is for its global batch %d; this run's is %d: pass --lr-base %g --lr-base-size %d to follow it, "
                "or --lr to set one",
                where,
                settings.lr,
                file["global_batch"],
                settings.global_batch,
                settings.lr,
                file["global_batch"],
            )
        return settings
    scale = settings.lr_base_scale or (
        "sqrt" if "ada" in settings.optimizer or "lamb" in settings.optimizer else "linear"
    )
    ratio = settings.global_batch / settings.lr_base_size
    lr = settings.lr_base * (ratio if scale == "linear" else math.sqrt(ratio))
    return dataclasses.replace(settings, lr=lr, lr_base_scale=scale)
