"""What each command does: resolve settings, open inputs, call one stage, save config and log."""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from stages.datasets import ImageDataset, open_dataset, validation_data
from stages.distill import EpochHooks, TrainSettings, train
from stages.teacher_sources import LiveTeacher, TeacherSource, cached_teacher, pick_teacher
from stages.extract import TeacherRunner, check_classes, check_dataset, extract, open_store, stored_plan, teacher_info
from stages.cache import output_info, storage_line
from stages import stats, verify
from stages.methods import method_class
from stages.replay import DrawnViews, StoredViews
from stages.teachers import build_teacher
from stages.views import ViewPlan, ViewRecipe
from storage import Location, Store, UserError

from . import config, ray_env, ray_extract

log = logging.getLogger("pipeline")

__all__ = ["TrainSettings", "ViewRecipe", "distill_command", "extract_command", "stats_command", "train_command"]


@contextmanager
def run_log(path: Path | Location):
    """Also write this run's log lines to ``path``; a log for an object store is uploaded at the end."""
    local = path if isinstance(path, Path) else Path(path.path) if path.is_local else None
    tmp = None
    if local is None:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
        local = Path(tmp.name)
    local.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(local)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        if tmp is not None:
            path.write_bytes(local.read_bytes())
            local.unlink()


def view_recipe(args, base: ViewRecipe | None = None) -> ViewRecipe:
    """View flags over the ``views:`` section of --config over ``base`` (a store's recipe, or the defaults)."""
    file = config.load_yaml(args.config).get("views", {}) if args.config else {}
    flags = {"scale": args.scale, "ratio": args.ratio, "hflip": args.hflip, "eval_crop": args.eval_crop}
    return config.build(ViewRecipe, config.merge((base or ViewRecipe()).to_dict(), file, flags), args.config or "view flags")


def teacher_from_flags(args, dataset: ImageDataset, input_size: int | None):
    """The teacher named by --teacher, --weights / --random-init and its seed flag."""
    return build_teacher(
        args.teacher,
        weights=args.weights,
        random_init=args.random_init,
        num_classes=dataset.num_classes,
        seed=args.teacher_seed,
        input_size=input_size,
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
        **fixed,
    }
    method = flags.get("method") or file.get("method") or TrainSettings.method
    settings = config.merge(config.recipe(f"methods/{method}"), file, flags)
    if not 0.0 <= settings.get("label_fraction", 1.0) <= 1.0:
        raise UserError(f"--label-fraction must lie in [0, 1], not {settings['label_fraction']}")
    return config.build(TrainSettings, settings, args.config or "the command line")


def train_command(args) -> None:
    out = Path(args.out)
    dataset = open_dataset(args.data)
    val = validation_data(args.data, args.val_data)
    settings = train_settings(args, student=args.model, student_kwargs=config.parse_pairs(args.model_arg, "--model-arg"), method="ce")
    plan = ViewPlan(view_recipe(args), args.plan_seed or 0)
    with run_log(out / "run.log"):
        config.save(out / "config.yaml", {"command": "train", "data": args.data, "views": plan.describe(), "train": settings})
        # A fresh view of every sample each epoch, drawn from the plan (nothing stored).
        views = DrawnViews(plan, dataset, num_views=settings.epochs)
        result = train(settings, dataset, val, views, plan, out_dir=out, weights_name="model.safetensors")
    final = result.metrics[-1]
    print(f"{args.model}: val top-1 {final.get('val_top1', float('nan')):.4f} after {settings.epochs} epochs -> {out / 'model.safetensors'}")


def extract_command(args) -> None:
    dataset = open_dataset(args.data)
    teacher = teacher_from_flags(args, dataset, args.size)
    # --actors N, or a cluster address without --actors, runs on Ray; the driver then needs no GPU.
    use_ray = args.actors > 0 if args.actors is not None else ray_env.resolve_address(args.ray_address) is not None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available() and not use_ray:
        raise UserError(f"--device {device} was asked for but no CUDA GPU is visible here: use --device cpu")
    outputs = [o.strip() for o in args.outputs.split(",")] if args.outputs else None
    info = teacher_info(
        teacher, output_info(teacher, logits=args.logits, k=args.topk, dtype=args.dtype, feature_dtype=args.feature_dtype, outputs=outputs), args.format, args.precision
    )
    # Everything that can be checked is checked before a store directory exists.
    check_classes(info, dataset.num_classes)
    if use_ray:  # cluster, GPUs and store visibility are checked before a store directory exists
        gpus_per_worker, actors, device = ray_extract.join_cluster(args)
    # Before any work, so a store of unexpected size (tokens) can be stopped at once.
    log.info(storage_line(args.teacher_id or _teacher_id(args.teacher), info, len(dataset), args.views))
    dataset.sizes()  # reads every image header: unreadable files surface now
    store_path = args.store
    if Store.exists(store_path):
        made = Store(store_path).meta["plan"]
        plan = ViewPlan(view_recipe(args, ViewRecipe.from_dict(made["recipe"])), made["seed"] if args.plan_seed is None else args.plan_seed)
    else:
        plan = ViewPlan(view_recipe(args), args.plan_seed or 0)
    store = open_store(store_path, dataset, plan, views=args.views, block=args.block, size=teacher.input_size)
    teacher_id = args.teacher_id or _teacher_id(args.teacher)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with run_log(store.path / "logs" / f"extract-{teacher_id}-{stamp}.log"):
        (store.path / "logs" / f"extract-{teacher_id}-{stamp}.yaml").write_bytes(config.dump({"command": "extract", **vars(args), "func": None}).encode())
        log.info("extract %s (%s, %s) on %s into %s: %d views x %d samples", teacher_id, info["timm_name"], info["weights"], device, store.path, args.views, len(dataset))
        with store.lock_teacher(teacher_id):
            if args.repair:
                damaged = verify.take_back_damaged(store, teacher_id)
                log.info("repair: %d damaged unit(s) taken back%s", len(damaged), "".join(f"\n  {f.group} view {f.view} block {f.block}: {f.problem}" for f in damaged))
            if use_ray:
                spec = ray_extract.ActorSpec(
                    data=ray_env.source_for_workers(args.data), fingerprint=dataset.fingerprint(), store=ray_env.for_workers(store.path).url, teacher_id=teacher_id,
                    teacher=args.teacher, weights=args.weights, random_init=args.random_init, seed=args.teacher_seed, size=args.size,
                    info=info, device=device, batch_size=args.batch_size, workers=args.workers,
                )
                result = ray_extract.extract_on_ray(store, dataset, spec, views=args.views, actors=actors, gpus_per_worker=gpus_per_worker)
            else:
                result = extract(store, dataset, TeacherRunner(teacher, info, device), teacher_id, views=args.views, batch_size=args.batch_size, workers=args.workers)
    rate = result.views / result.seconds if result.seconds > 0 else 0.0
    print(
        f"{teacher_id}: {result.units} units extracted ({result.views:,} views, {rate:,.0f} views/s), "
        f"{result.skipped} already committed -> {store.path}"
    )


def distill_command(args, on_epoch: Callable[[dict], None] | None = None) -> None:
    """``pipeline distill``; ``on_epoch(line)`` sees each epoch's metrics line (a sweep reports it to Ray Tune)."""
    _check_ray_flags(args)
    store = Store(args.from_cache)
    plan = stored_plan(store)
    source = args.data or store.meta["dataset"]["source"]
    dataset = open_dataset(source)
    check_dataset(store, dataset)
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
    teacher = distill_teacher(args, store, dataset, method_class(settings.method).needs)
    out = Path(args.out)
    with run_log(out / "run.log"):
        config.save(
            out / "config.yaml",
            {"command": "distill", "store": str(store.path), "online": args.online, "teacher": args.teacher, "data": source,
             "workers": args.workers, "gpus_per_worker": args.gpus_per_worker, "train": settings},
        )
        views = StoredViews(store, plan, None if teacher is None else teacher.num_views)
        if views.num_views == 0:
            raise UserError(f"store {store.path} has no complete view yet: finish `pipeline extract` first")
        if args.workers:
            result = _distill_on_ray(args, store, source, views.num_views, settings, out)
        else:
            hooks = EpochHooks(save=lambda state, line: on_epoch(line)) if on_epoch else None
            result = train(settings, dataset, val, views, plan, teacher, out_dir=out, hooks=hooks)
    final = result.metrics[-1]
    mode = "online teacher" if args.online else f"cache {store.path}"
    ray = f", {args.workers} Ray Train worker(s)" if args.workers else ""
    print(
        f"{settings.student} ({settings.method}, {mode}{ray}): val top-1 {final.get('val_top1', float('nan')):.4f} "
        f"after {settings.epochs} epochs, {result.seconds:.1f} s -> {out / 'student.safetensors'}"
    )


def _check_ray_flags(args) -> None:
    if args.workers < 0:
        raise UserError(f"--workers must be 0 (train in this process) or more, not {args.workers}")
    if args.workers == 0 and (args.resume or args.gpus_per_worker or args.checkpoints):
        raise UserError("--resume, --checkpoints and --gpus-per-worker are for Ray Train runs: pass --workers N (N >= 1)")
    if args.workers and args.online:
        raise UserError("--online runs the teacher in this process: leave --workers at 0, or distil from the cache")


def distill_teacher(args, store: Store, dataset: ImageDataset, needs) -> TeacherSource | None:
    """The teacher a distill run reads: the cached one(s) named by --teacher, or with --online the live one."""
    if not args.online:
        return cached_teacher(store, args.teacher, args.teacher_weights, needs)
    if not args.teacher:
        raise UserError("--online needs --teacher NAME (with --weights FILE or --random-init)")
    live = teacher_from_flags(args, dataset, args.teacher_size or store.meta["plan"]["size"])
    if "logits" in needs and live.num_classes != dataset.num_classes:
        raise UserError(f"teacher '{args.teacher}' predicts {live.num_classes} classes but the dataset has {dataset.num_classes}")
    # Class means (KD++) describe the teacher, so they come from its cache's statistics when the store has them.
    teacher_id = _teacher_id(args.teacher)
    means = stats.class_means(store, teacher_id) if teacher_id in store.teacher_ids() else None
    return LiveTeacher(live, needs, class_means=means)


def _distill_on_ray(args, store: Store, source: str, num_views: int, settings: TrainSettings, out: Path):
    from .ray_train import distill_on_ray  # Ray only where it is asked for

    job = {"store": ray_env.for_workers(store.path).url, "data": ray_env.source_for_workers(source),
           "val_data": ray_env.source_for_workers(args.val_data), "teacher": args.teacher,
           "teacher_weights": args.teacher_weights, "num_views": num_views, "settings": dataclasses.asdict(settings)}
    return distill_on_ray(job, out, workers=args.workers, gpus_per_worker=args.gpus_per_worker, address=args.ray_address,
                          max_failures=args.max_failures, resume=args.resume, checkpoints=args.checkpoints)


def stats_command(args) -> None:
    store = Store(args.store)
    dataset = open_dataset(store.meta["dataset"]["source"] if not args.data else args.data)
    check_dataset(store, dataset)
    for teacher_id in [args.teacher] if args.teacher else store.teacher_ids():
        arrays = stats.write_stats(store, teacher_id, dataset.labels)
        C, D = arrays["class_means"].shape
        print(f"{teacher_id}: class means ({C} x {D}), feature mean and covariance -> {store.path / 'stats' / teacher_id}")


def verify_command(args) -> None:
    store = Store(args.store)
    dataset = None
    if args.replay > 0:
        dataset = open_dataset(args.data or store.meta["dataset"]["source"])
        check_dataset(store, dataset)
    teachers = [pick_teacher(store, args.teacher)] if args.teacher else None
    report = verify.check_store(store, dataset, teachers, replay_fraction=args.replay, workers=args.workers)
    for f in report.findings:
        print(f"{f.group} view {f.view} block {f.block}: {f.problem}")
    summary = f"{report.units} committed units checked, {report.views_replayed} views replayed"
    if report.ok:
        print(f"{store.path}: sound ({summary})")
        return
    kinds = {f.kind for f in report.findings}
    todo = []
    if kinds & {"missing", "damaged"}:
        todo.append("run the extract command again with --repair")
    if "replay" in kinds:
        todo.append("compare the versions in store.json with this environment")
    raise UserError(f"{store.path}: {len(report.findings)} bad unit(s) ({summary}): {'; '.join(todo)}")


def _teacher_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
