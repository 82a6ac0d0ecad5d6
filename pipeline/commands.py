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
from stages.distill import TrainSettings, check_repeats, resolve_batch, train
from stages.teacher_sources import LiveTeacher, TeacherSource, cached_teacher, pick_teacher
from stages.extract import TeacherRunner, check_classes, check_teacher_record, extract, teacher_info
from stages.store_setup import check_dataset, check_plan, data_source, open_store, store_dataset, stored_plan
from stages.cache import output_info, storage_line
from stages import stats, verify
from stages.methods import list_methods, method_class
from stages.replay import DrawnViews, StoredViews
from stages.student import build_student
from stages.teachers import build_teacher
from stages.views import ViewPlan, ViewRecipe
from storage import Location, Store, UserError
from storage.names import check_name

from . import config, ray_env, ray_extract, settings_check
from .resume import checkpoint_hooks

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
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    try:
        yield
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        if tmp is not None:
            path.write_bytes(local.read_bytes())
            local.unlink()


class RunFiles:
    """A training run's ``config.yaml`` and ``run.log`` in OUT, written only once the run has passed its set-up.

    A run refused at set-up (a bad setting, a student or a method that cannot be built, a cluster that
    cannot be reached) leaves OUT as it was, so a folder of an earlier run keeps files that agree with
    each other. Log lines from before ``start()`` are held and go to run.log when it opens; config.yaml
    is replaced through a rename, never left half-written.
    """

    def __init__(self, out: Path, record: dict):
        self.out, self.record = out, record
        self.held = _HeldLines()
        self.file: logging.Handler | None = None

    def __enter__(self) -> "RunFiles":
        logging.getLogger().addHandler(self.held)
        return self

    def start(self) -> None:
        """The run begins: write config.yaml, open run.log with the lines so far."""
        if self.file is not None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        config.save(self.out / "config.yaml", self.record)
        self.file = logging.FileHandler(self.out / "run.log")
        self.file.setFormatter(logging.Formatter(LOG_FORMAT))
        for record in self.held.records:
            self.file.handle(record)
        root = logging.getLogger()
        root.removeHandler(self.held)
        root.addHandler(self.file)

    def __exit__(self, *exc) -> None:
        root = logging.getLogger()
        root.removeHandler(self.held)
        if self.file is not None:
            root.removeHandler(self.file)
            self.file.close()


class _HeldLines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def check_out(out: Path) -> Path:
    """--out: a run directory that exists, or one that can be made (its nearest existing parent is a directory)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: pass a new or an existing run directory")
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out} cannot be made: {parent} is a file, not a directory")
    return out


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


def local_device(flag: str | None) -> str:
    """--device, else cuda when a GPU is visible, else cpu."""
    device = flag or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but no CUDA GPU is visible here: use --device cpu")
    index = device.partition(":")[2]
    if device.startswith("cuda") and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine shows {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but this machine has no Apple GPU: use --device cpu")
    return device


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


BLOCK = 1024  # samples per shard of a new store


def extract_command(args) -> None:
    dataset = open_dataset(args.data)
    teacher = teacher_from_flags(args, dataset, args.size)
    teacher_id = check_name(args.teacher_id or _teacher_id(args.teacher), "teacher id (--teacher-id)")
    # --actors N, or a cluster address without --actors, runs on Ray; the driver then needs no GPU.
    use_ray = args.actors > 0 if args.actors is not None else ray_env.resolve_address(args.ray_address) is not None
    device = None if use_ray else local_device(args.device)  # on Ray, the actors' device comes from the cluster
    outputs = [o.strip() for o in args.outputs.split(",")] if args.outputs else None
    info = teacher_info(
        teacher, output_info(teacher, logits=args.logits, k=_topk(args, teacher), dtype=args.dtype, feature_dtype=args.feature_dtype, outputs=outputs),
        args.format, args.precision,
    )
    # Everything that can be checked is checked before a store directory exists or an existing one changes.
    check_classes(info, dataset.num_classes)
    if teacher.input_size:
        settings_check.check_batch_bytes(args.batch_size, teacher.input_size, "the teacher's batch")
    store_path = args.store
    if Store.exists(store_path):
        made = Store(store_path)
        if args.block is not None and args.block != made.block:
            raise UserError(
                f"store {made.path} has blocks of {made.block} samples, fixed when it was made: "
                f"leave --block out (or pass --block {made.block}), or extract into a new --store"
            )
        plan = ViewPlan(view_recipe(args, ViewRecipe.from_dict(made.meta["plan"]["recipe"])), made.meta["plan"]["seed"] if args.plan_seed is None else args.plan_seed)
        check_dataset(made, dataset)
        check_plan(made, plan)
        check_teacher_record(made, teacher_id, info)
    else:
        plan = ViewPlan(view_recipe(args), args.plan_seed or 0)
    if use_ray:  # cluster, GPUs and store visibility are checked before a store directory exists
        gpus_per_worker, actors, device = ray_extract.join_cluster(args)
    # Before any work, so a store of unexpected size (tokens) can be stopped at once.
    log.info(storage_line(teacher_id, info, len(dataset), args.views))
    dataset.sizes()  # reads every image header: unreadable files surface now
    if note := dataset.order_note():  # shards written in class order: blocks cannot be random samples
        log.warning(note)
    store = open_store(store_path, dataset, plan, views=args.views, block=args.block or BLOCK, size=teacher.input_size)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with run_log(store.path / "logs" / f"extract-{teacher_id}-{stamp}.log"):
        (store.path / "logs" / f"extract-{teacher_id}-{stamp}.yaml").write_bytes(config.dump({"command": "extract", **vars(args), "func": None}).encode())
        log.info("extract %s (%s, %s) on %s into %s: %d views x %d samples", teacher_id, info.timm_name, info.weights, device, store.path, args.views, len(dataset))
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
    teacher_id = _teacher_id(args.teacher)
    means = stats.class_means(store, teacher_id) if teacher_id in store.teacher_ids() else None
    return LiveTeacher(live.to(device or "cpu"), needs, class_means=means)


def _distill_on_ray(args, store: Store, source: str, num_views: int, settings: TrainSettings, out: Path, on_start: Callable[[], None]):
    from .ray_train import distill_on_ray  # Ray only where it is asked for

    job = {"store": ray_env.for_workers(store.path).url, "data": ray_env.source_for_workers(source),
           "val_data": ray_env.source_for_workers(args.val_data), "teacher": args.teacher,
           "teacher_weights": args.teacher_weights, "num_views": num_views, "settings": dataclasses.asdict(settings)}
    return distill_on_ray(job, out, workers=args.workers, gpus_per_worker=args.gpus_per_worker, address=args.ray_address,
                          max_failures=args.max_failures, resume=args.resume, checkpoints=args.checkpoints, on_start=on_start)


def stats_command(args) -> None:
    if args.teacher:
        check_name(args.teacher, "--teacher")  # it names stats/<id> in the store
    store = Store(args.store)
    dataset = store_dataset(store, args.data)
    for teacher_id in [args.teacher] if args.teacher else store.teacher_ids():
        arrays = stats.write_stats(store, teacher_id, dataset.labels)
        C, D = arrays["class_means"].shape
        print(f"{teacher_id}: class means ({C} x {D}), feature mean and covariance -> {store.path / 'stats' / teacher_id}")


def verify_command(args) -> None:
    store = Store(args.store)
    dataset = None
    if args.replay > 0:
        dataset = store_dataset(store, args.data)
    teachers = [pick_teacher(store, args.teacher)] if args.teacher else None
    report = verify.check_store(store, dataset, teachers, replay_fraction=args.replay, workers=args.workers)
    for f in report.findings:
        print(f"{f.group} view {f.view} block {f.block}: {f.problem}")
    summary = f"{report.units} committed units checked, {report.views_replayed} views replayed"
    if report.ok:
        print(f"{store.path}: sound ({summary})")
        return
    count = {kind: sum(f.kind == kind for f in report.findings) for kind in ("missing", "damaged", "replay")}
    todo = []
    if count["missing"]:
        todo.append(f"{count['missing']} unit(s) not extracted yet: run the extract command again to finish (it resumes)")
    if count["damaged"]:
        todo.append(f"{count['damaged']} damaged unit(s): run the extract command again with --repair")
    if count["replay"]:
        todo.append(f"{count['replay']} unit(s) replay differently: compare the versions in store.json with this environment")
    if not count["damaged"] and not count["replay"]:
        raise UserError(f"{store.path}: unfinished ({summary}): {'; '.join(todo)}")
    raise UserError(f"{store.path}: {count['damaged'] + count['replay']} bad unit(s) ({summary}): {'; '.join(todo)}")


def _topk(args, teacher) -> int:
    """k of stored top-k logits: --topk, at most the teacher's class count; by default 10 (or every class when fewer)."""
    if args.topk is None:
        return min(TOPK, teacher.num_classes) if teacher.num_classes else TOPK
    if args.logits == "topk" and teacher.num_classes and args.topk > teacher.num_classes:
        raise UserError(
            f"--topk {args.topk} is more than the {teacher.num_classes} classes teacher '{teacher.spec.name}' predicts: "
            f"pass --topk {teacher.num_classes} or less, or --logits full"
        )
    return args.topk


TOPK = 10


def _teacher_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
