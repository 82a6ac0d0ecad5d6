"""`pipeline train` and `pipeline distill`: a student trained on drawn views, or on a store's replayed views and cached teacher.

Every training setting is a field of ``TrainSettings``: its flag, YAML key, check and help come from that one
declaration (``setting_flags.add_setting_flags``). A distill run is resolved once into a ``DistillJob``
(``pipeline.settings.distill_job``) and built by ``stages.training.job.build_distill``, in this process or in each Ray Train
worker; a sweep trial makes the same job from its settings (``train_settings``) without any command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from stages.data.datasets import open_dataset, validation_data
from stages.data.replay import DrawnViews
from stages.cpus import use_threads
from stages.data.views import ViewPlan
from stages.methods import list_methods, method_class
from stages.training.distill import train
from stages.training.job import DistillJob, build_distill
from stages.training.settings import TrainSettings
from stages.training.student import run_student

from pipeline.settings.shared_flags import (
    RAY_ADDRESS_HELP,
    THREADS_HELP,
    VAL_DATA_HELP,
    data_help,
    local_device,
    teacher_flags,
    view_flags,
    view_recipe,
)
from pipeline.settings.recipe import load_recipe, train_settings
from pipeline.runs.in_process import distill_here, result_line, run_record, top1_text
from pipeline.runs.resume import DATA_FINGERPRINT, checkpoint_hooks
from pipeline.settings.distill_job import distill_job
from pipeline.runs.files import RunFiles, check_out
from pipeline.settings.setting_flags import add_setting_flags, flag_type, settings_from_args

log = logging.getLogger("pipeline")

# Methods `pipeline train` runs: those that need no teacher at all (ce) or can do without one (gpd from scratch).
TEACHERLESS_METHODS = tuple(
    m for m in list_methods() if not method_class(m).needs or not method_class(m).requires_teacher
)
TRAIN_DEFAULTS = {"method": "ce"}  # where `train` differs from distill's defaults: it fits a model on labels
# `train` fits any model, often a teacher
TRAIN_RENAMES = {"student": "--model", "student_kwargs": "--model-arg", "student_weights": "--model-weights"}


# -- flags ---------------------------------------------------------------------------------------------


def _run_flags(p: argparse.ArgumentParser, ray_train: bool) -> None:
    g = p.add_argument_group("the run")
    g.add_argument(
        "--config",
        help="YAML recipe: any training setting (the flags' names with _), method_args, views (default: none)",
    )
    g.add_argument(
        "--device",
        type=flag_type("device"),
        help="where the student trains, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)",
    )
    where = ", or Ray Train's under OUT/ray with --ray-workers N" if ray_train else ""
    g.add_argument(
        "--out", required=True, help="run directory: weights, metrics.jsonl, config.yaml, run.log, checkpoint.pt"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help=f"continue the run under --out from its last checkpoint (OUT/checkpoint.pt{where}), e.g. with more --epochs (default: off, start afresh)",
    )
    g.add_argument("--threads", type=flag_type("threads"), help=THREADS_HELP)


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="supervised training of any timm model (for example to fit a teacher)")
    p.add_argument("--data", required=True, help=data_help())
    p.add_argument("--val-data", help=VAL_DATA_HELP)
    g = p.add_argument_group("training (every setting also a --config key)")
    add_setting_flags(
        g,
        TrainSettings,
        skip=("verify",),
        rename=TRAIN_RENAMES,
        choices={"method": TEACHERLESS_METHODS},
        defaults=TRAIN_DEFAULTS,
        helps={
            "student": "timm model name of the trained model",
            "method": "ce: labels only; gpd: the model trained beside its widened dynamic teacher, GPD's from-scratch mode",
            "size": "input size of the trained model",
        },
    )
    _run_flags(p, ray_train=False)
    view_flags(p)
    p.set_defaults(func=train_command)


def add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="stage two: train a student from a store's cached teacher outputs")
    p.add_argument(
        "--from-cache",
        required=True,
        metavar="STORE",
        type=flag_type("from_cache"),
        help="the store made by `pipeline extract`",
    )
    _teacher_group(p)
    p.add_argument(
        "--data",
        help=data_help("the training data, when it moved since extraction")
        + " (default: the store's; must match its fingerprint)",
    )
    p.add_argument("--val-data", help=VAL_DATA_HELP)
    add_setting_flags(
        p.add_argument_group("training (every setting also a --config key)"),
        TrainSettings,
        known={"method": list_methods()},
    )
    _run_flags(p, ray_train=True)
    _ray_train_flags(p)
    p.set_defaults(func=distill_command)


def _teacher_group(p: argparse.ArgumentParser) -> None:
    """The cached teacher(s) a run reads, or the model it runs live with --online."""
    g = p.add_argument_group("the teacher")
    g.add_argument(
        "--teacher-id",
        type=str,
        help="the cached teacher's id in the store, or several as a,b to average their probabilities (default: the store's only teacher)",
    )
    g.add_argument(
        "--teacher-weights",
        type=flag_type("teacher_weights"),
        help="weights of the teachers in --teacher-id a,b, e.g. 0.7,0.3 (default: equal)",
    )
    g.add_argument(
        "--online",
        action="store_true",
        help="run the --teacher model live on the same replayed views instead of reading the cache (default: off)",
    )
    g.add_argument(
        "--teacher", help="with --online, the teacher model to run: a short name or any timm model (default: none)"
    )
    teacher_flags(g)
    g.add_argument(
        "--teacher-size",
        type=flag_type("teacher_size"),
        help="render size of the live teacher (default: the store's view size)",
    )


def _ray_train_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Train (DDP: gloo on CPUs, NCCL on GPUs)")
    g.add_argument(
        "--ray-workers",
        type=flag_type("ray_workers"),
        default=0,
        help="Ray Train workers, each training on its own part of the store; 0 trains in this process without Ray (default: 0)",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=flag_type("gpus_per_worker"),
        default=0,
        help="GPUs for each Ray Train worker; 0 trains on CPUs with gloo, 1 or more on CUDA with NCCL (default: 0)",
    )
    g.add_argument(
        "--ray-address", metavar="ADDR", help=f"{RAY_ADDRESS_HELP} (default: RAY_ADDRESS, else a local Ray instance)"
    )
    g.add_argument(
        "--max-failures",
        type=flag_type("max_failures"),
        default=3,
        help="times a run restarts from its last checkpoint after a worker fails (default: 3)",
    )
    g.add_argument(
        "--checkpoints",
        metavar="DIR_OR_URL",
        type=flag_type("checkpoints"),
        help="where Ray Train keeps a checkpoint per epoch: a directory every node mounts, or a URL such as s3://bucket/runs/a (default: OUT/ray)",
    )


# -- the commands --------------------------------------------------------------------------------------


def train_command(args) -> None:
    out = check_out(Path(args.out))
    dataset = open_dataset(args.data)
    val = validation_data(dataset, args.val_data)
    recipe = load_recipe(args.config)
    fits = recipe.get("method") in TEACHERLESS_METHODS  # a recipe for train (gpd from scratch) keeps its method
    flags = {**({} if fits else TRAIN_DEFAULTS), **settings_from_args(args, TrainSettings, TRAIN_RENAMES)}
    settings = train_settings(recipe, flags, args.config or "the command line")
    plan = ViewPlan(view_recipe(args), args.plan_seed or 0)
    device = local_device(args.device)
    threads = use_threads(args.threads, settings.workers)
    # Nothing is written to --out before train() has built the model: a refused run leaves an earlier run's folder alone.
    with RunFiles(
        out,
        {"command": "train", "data": args.data, "views": plan.describe(), "train": settings},
        weights_name="model.safetensors",
    ) as files:
        # A fresh view of every sample each epoch, drawn from the plan (nothing stored).
        # R fresh views per use of a block
        views = DrawnViews(plan, dataset, num_views=settings.epochs * settings.repeats)
        run = {
            "data": args.data,
            DATA_FINGERPRINT: dataset.fingerprint(),
            "views": plan.describe(),
            **dataclasses.asdict(settings),
        }
        hooks = checkpoint_hooks(out, run, resume=args.resume, start=files.start)
        result = train(
            settings,
            dataset,
            val,
            views,
            plan,
            out_dir=out,
            weights_name="model.safetensors",
            device=device,
            hooks=hooks,
        )
    print(
        f"{settings.student}: {top1_text(result)} after {settings.epochs} epochs, {threads} thread(s) -> {out / 'model.safetensors'}"
    )


def distill_command(args) -> None:
    job = distill_job(args)
    out = check_out(Path(args.out))
    if args.ray_workers:
        result = _distill_on_ray(args, job, out)
        how = f", {args.ray_workers} Ray Train worker(s)"
    else:
        threads = use_threads(args.threads, job.train.workers)
        result = distill_here(job, out, device=local_device(args.device), resume=args.resume)
        how = f", {threads} thread(s)"
    mode = "online teacher" if job.online else f"cache {job.store}"
    print(f"{result_line(job, result, f', {mode}{how}')} -> {out / 'student.safetensors'}")


def _distill_on_ray(args, job: DistillJob, out: Path):
    from pipeline.cluster import ray_env
    from pipeline.cluster.train import distill_on_ray  # Ray only where it is asked for

    run = build_distill(job)  # every check of the store, data and teacher, here before Ray starts
    run_student(job.train, run.dataset.num_classes)  # bad student settings fail now
    where = dataclasses.replace(
        job,
        store=ray_env.for_workers(run.store.path).url,
        data=ray_env.source_for_workers(job.data or run.store.record.dataset.source),
        val_data=ray_env.source_for_workers(job.val_data),
    )
    record = run_record(
        job, ray_workers=args.ray_workers, gpus_per_worker=args.gpus_per_worker, views=run.plan.describe()
    )
    with RunFiles(out, record) as files:
        return distill_on_ray(
            where,
            out,
            workers=args.ray_workers,
            gpus_per_worker=args.gpus_per_worker,
            address=args.ray_address,
            max_failures=args.max_failures,
            resume=args.resume,
            checkpoints=args.checkpoints,
            on_start=files.start,
            threads=args.threads,
        )
