"""`pipeline train` and `pipeline distill`: a student trained on drawn views, or on a store's replayed views and cached teacher."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Callable

from stages.cache import stats
from stages.cache.store_setup import data_source, store_dataset, stored_plan
from stages.data.datasets import ImageDataset, open_dataset, validation_data
from stages.data.replay import DrawnViews, StoredViews
from stages.data.views import ViewPlan
from stages.methods import list_methods, method_class
from stages.teachers.teacher_sources import LiveTeacher, TeacherSource, cached_teacher
from stages.training.distill import TrainSettings, check_repeats, resolve_batch, train
from stages.training.student import build_student
from storage import Store, UserError

from . import config, ray_env, settings_check
from .flags import RAY_ADDRESS_HELP, local_device, teacher_flags, teacher_from_flags, teacher_id_of, view_flags, view_recipe
from .resume import checkpoint_hooks
from .run_files import RunFiles, check_out

log = logging.getLogger("pipeline")

TRAIN_DEFAULTS = TrainSettings()


def _training_flags(p: argparse.ArgumentParser, *, epochs: int | None = None) -> None:
    d = TRAIN_DEFAULTS
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help=f"training epochs (default: {epochs or d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"samples per optimiser step per worker, as timm's flag (with --workers N the global batch is N times it); a last partial batch is dropped (default: a --config recipe's global_batch split over the workers, else {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"AdamW peak learning rate, cosine decay (default: {d.lr})")
    g.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default: {d.weight_decay})")
    g.add_argument("--warmup-epochs", type=float, help=f"linear learning-rate warm-up (default: {d.warmup_epochs})")
    g.add_argument("--seed", type=int, help=f"seed of the student's initialisation and data order (default: {d.seed})")
    g.add_argument("--size", type=int, help="input size of the trained model (default: the store's view size, else the model's own)")
    g.add_argument(
        "--label-fraction",
        type=float,
        help="share of training samples whose label the student may use, stratified per class; the others are "
        f"supervised by the teacher alone, 0 trains from the cache only (default: {d.label_fraction})",
    )
    g.add_argument("--loader-workers", type=int, help=f"loader processes rendering views (default: {d.loader_workers}, render in the main process)")
    g.add_argument("--config", help="YAML file of settings (any TrainSettings field, method_args); flags override it")
    g = p.add_argument_group("speed (what timm's train.py gives a GPU user)")
    g.add_argument("--device", help="where the student trains, e.g. cuda, cuda:1, cpu (default: cuda when available, else cpu)")
    g.add_argument("--amp", choices=("bf16", "fp16"), help="autocast of each step: bf16, or fp16 with a gradient scaler (CUDA only) (default: off, float32)")
    g.add_argument("--channels-last", action="store_true", default=None, help="NHWC student and inputs, faster convolutions on GPUs (default: off)")
    g.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm to NORM (default: no clipping)")
    g.add_argument("--model-ema", type=float, metavar="DECAY", help="also keep an EMA of the student (timm ModelEmaV3, e.g. 0.9998), evaluated each epoch and saved beside it (default: off)")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the student (default: off)")
    g.add_argument("--out", required=True, help="run directory: weights, metrics.jsonl, config.yaml, run.log, checkpoint.pt (ray/ checkpoints instead with --workers N)")
    g.add_argument("--resume", action="store_true", help="continue the run under --out from its last checkpoint (OUT/checkpoint.pt, or Ray Train's with --workers N), e.g. with more --epochs (default: off, start afresh)")

def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="supervised training of any timm model (for example to fit a teacher)")
    p.add_argument("--data", required=True, help="training data: digits, folder:PATH, fake:N or wds:PATTERN (tar shards, local or s3://..., e.g. train-{0000..0099}.tar)")
    p.add_argument("--val-data", help="validation data for folder and wds datasets: folder:PATH with the same class folders, or wds:PATTERN (default: digits and fake have their own split; none for folders and shards)")
    p.add_argument("--model", required=True, help="timm model name")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra timm.create_model argument, YAML value (repeatable; default: none)")
    p.add_argument(
        "--method", choices=TEACHERLESS_METHODS,
        help="ce: labels only; gpd: the model trained beside its widened dynamic teacher, GPD's from-scratch mode (default: ce)",
    )
    view_flags(p)
    _training_flags(p)
    p.set_defaults(func=train_command)

def add_distill_parser(sub) -> None:
    p = sub.add_parser("distill", help="stage two: train a student from a store's cached teacher outputs")
    p.add_argument("--from-cache", required=True, metavar="STORE", help="the store made by `pipeline extract`")
    p.add_argument("--teacher", help="teacher id in the store, or several as a,b to average their probabilities (default: its only teacher); with --online, the teacher to run")
    p.add_argument("--teacher-weights", help="weights of the teachers in --teacher a,b, e.g. 0.7,0.3 (default: equal)")
    p.add_argument("--online", action="store_true", help="run the teacher live on the same replayed views instead of reading the cache (default: off)")
    teacher_flags(p, "--teacher-seed")
    p.add_argument("--teacher-size", type=int, help="render size of the live teacher (default: the store's view size)")
    p.add_argument("--student", help=f"timm model name of the student (default: {TRAIN_DEFAULTS.student})")
    p.add_argument("--student-arg", action="append", metavar="KEY=VALUE", help="extra timm.create_model argument, YAML value, e.g. channels=[8,16,32,64] (repeatable; default: none)")
    p.add_argument("--method", help=f"distillation method (default: {TRAIN_DEFAULTS.method}); its recipe is configs/methods/NAME.yaml")
    p.add_argument("--method-arg", action="append", metavar="KEY=VALUE", help="method setting, e.g. temperature=4 (repeatable; default: the method's recipe in configs/methods/)")
    p.add_argument("--data", help="training data, when it moved since extraction (default: the store's; must match its fingerprint)")
    p.add_argument("--val-data", help="validation data for folder and wds datasets: folder:PATH with the same class folders, or wds:PATTERN (default: digits and fake have their own split; none for folders and shards)")
    p.add_argument("--verify", choices=("all", "sample", "none"), help="replayed views checked against the stored fingerprints (default: sample, about 1 in 100)")
    _training_flags(p)
    _distill_ray_flags(p)
    p.set_defaults(func=distill_command)

def _distill_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Train (DDP: gloo on CPUs, NCCL on GPUs)")
    g.add_argument("--workers", type=int, default=0, help="Ray Train workers, each training on its own part of the store; 0 trains in this process without Ray (default: 0)")
    g.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs for each Ray Train worker; 0 trains on CPUs with gloo, 1 or more on CUDA with NCCL (default: 0)")
    g.add_argument("--ray-address", metavar="ADDR", help=f"{RAY_ADDRESS_HELP} (default: RAY_ADDRESS, else a local Ray instance)")
    g.add_argument("--max-failures", type=int, default=3, help="times a run restarts from its last checkpoint after a worker fails (default: 3)")
    g.add_argument(
        "--checkpoints", metavar="DIR_OR_URL",
        help="where Ray Train keeps a checkpoint per epoch: a directory every node mounts, or a URL such as s3://bucket/runs/a (default: OUT/ray)",
    )

def train_settings(args, **fixed) -> TrainSettings:
    """Defaults < method recipe < --config < flags."""
    file = config.load_yaml(args.config) if args.config else {}
    file.pop("views", None)  # a recipe's view section is for extract and train
    flags = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "seed": args.seed,
        "size": args.size,
        "label_fraction": args.label_fraction,
        "loader_workers": args.loader_workers,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "clip_grad": args.clip_grad,
        "model_ema": args.model_ema,
        "compile": args.compile,
        **fixed,
    }
    method = settings_check.TRAIN["method"](flags.get("method") or file.get("method") or TrainSettings.method, "method")
    merged = config.merge(config.recipe(f"methods/{method}"), file, flags)
    settings = config.build(TrainSettings, merged, args.config or "the command line")
    settings = with_batch(settings, merged, args.batch_size, getattr(args, "workers", 0) or 0, args.config or "the command line")
    where = f"--method-arg, method_args in {args.config or 'no --config'} or configs/methods/{method}.yaml"
    settings_check.check_method_args(method_class(settings.method), settings.method_args, where)
    if settings.size is not None:
        settings_check.check_batch_bytes(settings.batch_size, settings.size, args.config or "the command line")
    return settings

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

# Methods `pipeline train` runs: those that need no teacher at all (ce) or can do without one (gpd from scratch).
TEACHERLESS_METHODS = tuple(m for m in list_methods() if not method_class(m).needs or not method_class(m).requires_teacher)

def train_command(args) -> None:
    out = check_out(Path(args.out))
    dataset = open_dataset(args.data)
    val = validation_data(args.data, args.val_data)
    method = getattr(args, "method", None) or "ce"
    settings = train_settings(args, student=args.model, student_kwargs=config.parse_pairs(args.model_arg, "--model-arg"), method=method)
    plan = ViewPlan(view_recipe(args), args.plan_seed or 0)
    device = local_device(args.device)
    # Nothing is written to --out before train() has built the model: a refused run leaves an earlier run's folder alone.
    with RunFiles(out, {"command": "train", "data": args.data, "views": plan.describe(), "train": settings}) as files:
        # A fresh view of every sample each epoch, drawn from the plan (nothing stored).
        views = DrawnViews(plan, dataset, num_views=settings.epochs * settings.repeats)  # R fresh views per use of a block
        run = {"data": args.data, "views": plan.describe(), **dataclasses.asdict(settings)}
        hooks = checkpoint_hooks(out, run, resume=args.resume, start=files.start)
        result = train(settings, dataset, val, views, plan, out_dir=out, weights_name="model.safetensors", device=device, hooks=hooks)
    final = result.metrics[-1]
    print(f"{args.model}: val top-1 {final.get('val_top1', float('nan')):.4f} after {settings.epochs} epochs -> {out / 'model.safetensors'}")

def distill_command(args, on_epoch: Callable[[dict], None] | None = None) -> None:
    """``pipeline distill``; ``on_epoch(line)`` sees each epoch's metrics line (a sweep reports it to Ray Tune)."""
    _check_ray_flags(args)
    out = check_out(Path(args.out))
    store = Store(args.from_cache)
    plan = stored_plan(store)
    source = data_source(store, args.data)
    dataset = store_dataset(store, source)
    val = validation_data(source, args.val_data)
    settings = train_settings(
        args,
        student=args.student,
        student_kwargs=config.parse_pairs(args.student_arg, "--student-arg") or None,
        method=args.method,
        method_args=config.parse_pairs(args.method_arg, "--method-arg") or None,
        verify=args.verify,
        size=args.size or store.meta["plan"]["size"],
    )
    device = local_device(args.device) if not args.workers else None  # Ray Train workers get theirs from Ray
    teacher = distill_teacher(args, store, dataset, method_class(settings.method).needs, device)
    views = StoredViews(store, plan, None if teacher is None else teacher.num_views)
    if views.num_views == 0:
        raise UserError(f"store {store.path} has no complete view yet: finish `pipeline extract` first")
    check_repeats(settings, views)  # before Ray starts: the workers would refuse it
    if args.workers:  # the workers build the student: build it here once, so bad --student-arg values fail now
        build_student(settings.student, dataset.num_classes, settings.seed, **settings.student_kwargs)
    record = {"command": "distill", "store": str(store.path), "online": args.online, "teacher": args.teacher, "data": source,
              "workers": args.workers, "gpus_per_worker": args.gpus_per_worker, "train": settings}
    # Nothing is written to --out before the run has passed its set-up (see RunFiles).
    with RunFiles(out, record) as files:
        if args.workers:
            result = _distill_on_ray(args, store, source, views.num_views, settings, out, files.start)
        else:
            run = {"store": str(store.path), "teacher": args.teacher, "teacher_weights": args.teacher_weights, "online": args.online,
                   **dataclasses.asdict(settings)}
            hooks = checkpoint_hooks(out, run, resume=args.resume, start=files.start, on_epoch=on_epoch)
            result = train(settings, dataset, val, views, plan, teacher, out_dir=out, hooks=hooks, device=device)
    final = result.metrics[-1]
    mode = "online teacher" if args.online else f"cache {store.path}"
    ray = f", {args.workers} Ray Train worker(s)" if args.workers else ""
    print(
        f"{settings.student} ({settings.method}, {mode}{ray}): val top-1 {final.get('val_top1', float('nan')):.4f} "
        f"after {settings.epochs} epochs, {result.seconds:.1f} s -> {out / 'student.safetensors'}"
    )

def _check_ray_flags(args) -> None:
    if args.workers == 0 and (args.gpus_per_worker or args.checkpoints):
        raise UserError("--checkpoints and --gpus-per-worker are for Ray Train runs: pass --workers N (N >= 1)")
    if args.workers and args.online:
        raise UserError("--online runs the teacher in this process: leave --workers at 0, or distil from the cache")

def distill_teacher(args, store: Store, dataset: ImageDataset, needs, device=None) -> TeacherSource | None:
    """The teacher a distill run reads: the cached one(s) named by --teacher, or with --online the live one."""
    if not args.online:
        return cached_teacher(store, args.teacher, args.teacher_weights, needs)
    if not args.teacher:
        raise UserError("--online needs --teacher NAME (with --weights FILE or --random-init)")
    live = teacher_from_flags(args, dataset, args.teacher_size or store.meta["plan"]["size"])
    if "logits" in needs and live.num_classes != dataset.num_classes:
        raise UserError(f"teacher '{args.teacher}' predicts {live.num_classes} classes but the dataset has {dataset.num_classes}")
    # Class means (KD++) describe the teacher, so they come from its cache's statistics when the store has them.
    teacher_id = teacher_id_of(args.teacher)
    means = stats.class_means(store, teacher_id) if teacher_id in store.teacher_ids() else None
    return LiveTeacher(live.to(device or "cpu"), needs, class_means=means)

def _distill_on_ray(args, store: Store, source: str, num_views: int, settings: TrainSettings, out: Path, on_start: Callable[[], None]):
    from .ray_train import distill_on_ray  # Ray only where it is asked for

    job = {"store": ray_env.for_workers(store.path).url, "data": ray_env.source_for_workers(source),
           "val_data": ray_env.source_for_workers(args.val_data), "teacher": args.teacher,
           "teacher_weights": args.teacher_weights, "num_views": num_views, "settings": dataclasses.asdict(settings)}
    return distill_on_ray(job, out, workers=args.workers, gpus_per_worker=args.gpus_per_worker, address=args.ray_address,
                          max_failures=args.max_failures, resume=args.resume, checkpoints=args.checkpoints, on_start=on_start)
