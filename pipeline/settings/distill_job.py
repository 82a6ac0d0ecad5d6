"""A distill command line (and its --config file) resolved and checked once into a ``DistillJob``.

The job is all a run needs: ``stages.training.job.build_distill`` builds it in this process, in each Ray Train
worker, or in a sweep trial (which makes its job from a sweep's settings through ``train_settings`` instead).
"""

from __future__ import annotations

import dataclasses
import logging

from stages.cache.store_setup import stored_plan
from stages.training.job import DistillJob, OnlineTeacher
from stages.training.settings import TrainSettings
from storage import Store, UserError

from pipeline.settings.recipe import VIEWS, check_views, load_recipe, train_settings
from pipeline.settings.setting_flags import settings_from_args

log = logging.getLogger("pipeline")


def distill_job(args) -> DistillJob:
    """The run the distill flags (and their --config file) describe, resolved and checked once."""
    if args.ray_workers == 0 and (args.gpus_per_worker or args.checkpoints):
        raise UserError("--checkpoints and --gpus-per-worker are for Ray Train runs: pass --ray-workers N (N >= 1)")
    if args.ray_workers and args.online:
        raise UserError("--online runs the teacher in this process: leave --ray-workers at 0, or distil from the cache")
    if args.teacher and not args.online:
        raise UserError(
            f"--teacher names a model to run live: add --online, or name the cached teacher with --teacher-id {args.teacher}"
        )
    recipe = load_recipe(args.config)
    settings = train_settings(
        recipe, settings_from_args(args, TrainSettings), args.config or "the command line", args.ray_workers
    )
    _note_recipe_views(recipe, args.config, args.from_cache)
    if args.online and not args.teacher and not settings.methods.composite:  # a composite's parts may name their models
        raise UserError("--online needs --teacher NAME (with --weights FILE or --random-init)")
    online = (
        OnlineTeacher(args.teacher, args.weights, args.random_init, args.teacher_seed, args.teacher_size)
        if args.online
        else None
    )
    return DistillJob(
        args.from_cache, settings, args.teacher_id, args.teacher_weights, online, args.data, args.val_data
    )


def _note_recipe_views(recipe: dict, where: str | None, store: str) -> None:
    """A recipe's views: section is for extract, which fixes a store's views; distill replays the store's. One line
    when the two differ, so a recipe's augmentation is not taken for what the run trains on."""
    if not recipe.get(VIEWS):
        return
    asked, made = (
        dataclasses.asdict(check_views(recipe[VIEWS], where)),
        dataclasses.asdict(stored_plan(Store(store)).recipe),
    )
    differ = sorted(k for k in asked if asked[k] != made[k])
    if differ:
        log.warning(
            "the views: section of %s differs from the views store %s was made with (%s): distill replays the store's views "
            "(config.yaml records them); the recipe's are for `pipeline extract` into a new store",
            where,
            store,
            ", ".join(differ),
        )
