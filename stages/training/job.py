"""A distillation run as one typed, serialisable description, and the one builder that makes it ready to train.

``DistillJob`` says what a run is: the store, which cached teacher(s) or which live teacher, the training
settings (student, method and its settings, optimisation), and where the data moved since extraction. It
holds plain values only, so the command line, a Ray Train worker, a sweep trial and the demo all make the
same object (``to_dict`` / ``from_dict`` carry it to another process) and call ``build_distill``, which
opens the store, checks the data and the teacher against it, and returns a ``DistillRun`` whose ``train``
runs the loop. How a run is spread (in this process, Ray Train workers, a Tune trial) is not part of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from storage import Store, UserError

from ..cache import stats
from ..cache.store_setup import store_dataset, stored_plan
from ..data.datasets import ImageDataset, validation_data
from ..data.replay import StoredViews
from ..data.views import ViewPlan
from ..methods import Methods
from ..teachers.teacher_sources import LiveTeacher, PartsTeacher, TeacherSource, cached_parts, cached_teacher
from ..teachers.teachers import build_teacher, default_teacher_id
from .distill import EpochHooks, TrainResult, check_batch, check_repeats, train
from .settings import TrainSettings


@dataclass
class OnlineTeacher:
    """The teacher an ``--online`` run executes on the replayed views, instead of reading the cache."""

    name: str | None  # a short name or timm model; None: a composite method's parts name theirs (METHOD@MODEL)
    weights: str | None = None  # a local file (one per teacher, "a,b", for a composite's); None: the hub weights
    random_init: bool = False  # random weights from ``seed`` (tests)
    seed: int = 0
    size: int | None = None  # render size; None: the store's view size


@dataclass
class DistillJob:
    """Everything that makes a distillation run what it is, as plain values."""

    store: str  # a directory or URL
    train: TrainSettings = field(default_factory=TrainSettings)
    teacher_id: str | None = None  # the cached teacher, or several as "a,b" to average; None: the store's only one
    teacher_weights: str | None = None  # "0.7,0.3" for averaged teachers; None: equal
    online: OnlineTeacher | None = None
    data: str | None = None  # the training images, where they moved since extraction; None: the store's
    val_data: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DistillJob:
        online = d.get("online")
        return cls(**{**d, "train": TrainSettings(**d["train"]), "online": OnlineTeacher(**online) if online else None})

    def run_record(self) -> dict:
        """One flat dict of every setting, as a checkpoint records it: ``--resume`` refuses any change but epochs by name."""
        where = {k: v for k, v in self.to_dict().items() if k not in ("train", "data", "val_data")}
        return {**where, **dataclasses.asdict(self.train)}


@dataclass
class DistillRun:
    """A job made ready: the store, its view plan and data, the teacher source, the views to replay."""

    settings: TrainSettings  # the job's, with the student's size resolved against the store
    store: Store
    plan: ViewPlan
    dataset: ImageDataset
    val: ImageDataset | None
    views: StoredViews
    teacher: TeacherSource | None

    def train(self, *, out_dir: str | Path | None = None, hooks: EpochHooks | None = None, device="cpu") -> TrainResult:
        return train(
            self.settings,
            self.dataset,
            self.val,
            self.views,
            self.plan,
            self.teacher,
            out_dir=out_dir,
            hooks=hooks,
            device=device,
        )


def build_distill(job: DistillJob, device="cpu") -> DistillRun:
    """Open everything ``job`` names and check it against the store once, before any training or writing."""
    store = Store(job.store)
    plan = stored_plan(store)
    dataset = store_dataset(store, job.data)
    val = validation_data(dataset, job.val_data)
    settings = dataclasses.replace(job.train, size=job.train.size or store.record.plan.size)
    # Before any Ray worker starts: the workers the batch was resolved for, the store's size and its data.
    world = max(1, (settings.global_batch or settings.batch_size) // settings.batch_size)
    check_batch(
        settings, "the student's batch", size=settings.size, samples=len(dataset), block=store.block, world=world
    )
    if not job.online:
        teacher = cached_source(store, job)
    elif settings.methods.composite:
        teacher = _live_parts(job.online, settings.methods.teachers(), store, dataset, device)
    else:
        teacher = _live_teacher(job.online, job.teacher_id, store, dataset, settings.methods.needs, device)
    views = StoredViews(store, plan, None if teacher is None else teacher.num_views)
    if views.num_views == 0:
        raise UserError(f"store {store.path} has no complete view yet: finish `pipeline extract` first")
    check_repeats(settings, views)
    return DistillRun(settings, store, plan, dataset, val, views, teacher)


def _live_teacher(
    online: OnlineTeacher, teacher_id: str | None, store: Store, dataset: ImageDataset, needs, device
) -> LiveTeacher:
    live = build_teacher(
        online.name,
        weights=online.weights,
        random_init=online.random_init,
        num_classes=dataset.num_classes,
        seed=online.seed,
        input_size=online.size or store.record.plan.size,
    )
    if "logits" in needs and live.num_classes != dataset.num_classes:
        raise UserError(
            f"teacher '{online.name}' predicts {live.num_classes} classes but the dataset has {dataset.num_classes}"
        )
    # Class means (KD++) describe the teacher, so they come from its cache's statistics when the store has them.
    cached_id = teacher_id or default_teacher_id(online.name)
    means = stats.class_means(store, cached_id) if cached_id in store.teacher_ids() else None
    return LiveTeacher(live.to(device or "cpu"), needs, class_means=means)


def cached_source(store: Store, job: DistillJob) -> TeacherSource | None:
    """The cached teacher(s) ``job`` reads (one, several averaged, or each part's of a composite), checked against
    the store; None when its method reads no teacher."""
    methods = job.train.methods
    if not methods.needs:
        return None
    if methods.composite:
        _check_run_teacher_read(methods, job.teacher_id, "--teacher-id")
        if job.teacher_weights:
            raise UserError(
                f"--teacher-weights averages teachers under one method; the composite {methods.spec} gives each part its own teacher: drop --teacher-weights"
            )
        return cached_parts(store, methods.teachers(), job.teacher_id)
    return cached_teacher(store, job.teacher_id, job.teacher_weights, methods.needs)


def _check_run_teacher_read(methods: Methods, teacher: str | None, flag: str) -> None:
    """Refuse a run-wide teacher that no part of a composite reads (each that reads one names its own)."""
    if teacher and all(own for _, own, needs in methods.teachers() if needs):
        raise UserError(
            f"{flag} {teacher} is read by no part: every part of {methods.spec} that reads a teacher names its own (METHOD@TEACHER); drop {flag}"
        )


def _live_parts(
    online: OnlineTeacher, parts: list[tuple], store: Store, dataset: ImageDataset, device
) -> PartsTeacher | None:
    """With --online, each part's model (METHOD@MODEL, else --teacher) run live on the replayed views; one run per model."""
    if online.name and all(own for _, own, needs in parts if needs):
        raise UserError(
            f"--teacher {online.name} is run by no part: every part that reads a teacher names its own model (METHOD@MODEL); drop --teacher"
        )
    models = [(own or online.name) if needs else None for _, own, needs in parts]
    unnamed = [name for (name, _, needs), model in zip(parts, models) if needs and model is None]
    if unnamed:
        raise UserError(
            f"part {unnamed[0]} names no teacher to run: with --online write each part as METHOD@MODEL, or pass --teacher NAME"
        )
    names = list(dict.fromkeys(m for m in models if m))
    if not names:
        return None
    files = online.weights.split(",") if online.weights else [None] * len(names)
    if len(files) != len(names):
        raise UserError(
            f"--weights gives {len(files)} file(s) for {len(names)} live teacher(s) ({', '.join(names)}): one per teacher in that order, or none for hub weights"
        )
    sources = {}
    for name, weights in zip(names, files):
        needs = tuple(dict.fromkeys(k for (_, _, part_needs), m in zip(parts, models) if m == name for k in part_needs))
        sources[name] = _live_teacher(
            dataclasses.replace(online, name=name, weights=weights), None, store, dataset, needs, device
        )
    return PartsTeacher(sources, models)
