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
from ..cache.store_setup import data_source, store_dataset, stored_plan
from ..data.datasets import ImageDataset, validation_data
from ..data.replay import StoredViews
from ..data.views import ViewPlan
from ..methods import method_class
from ..settings import check_batch_bytes
from ..teachers.teacher_sources import LiveTeacher, TeacherSource, cached_teacher
from ..teachers.teachers import build_teacher, default_teacher_id
from .distill import EpochHooks, TrainResult, check_repeats, train
from .settings import TrainSettings


@dataclass
class OnlineTeacher:
    """The teacher an ``--online`` run executes on the replayed views, instead of reading the cache."""

    name: str  # a short name or timm model
    weights: str | None = None  # a local file; None: the hub weights
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
        return train(self.settings, self.dataset, self.val, self.views, self.plan, self.teacher, out_dir=out_dir, hooks=hooks, device=device)


def build_distill(job: DistillJob, device="cpu") -> DistillRun:
    """Open everything ``job`` names and check it against the store once, before any training or writing."""
    store = Store(job.store)
    plan = stored_plan(store)
    dataset = store_dataset(store, job.data)
    val = validation_data(data_source(store, job.data), job.val_data)
    settings = dataclasses.replace(job.train, size=job.train.size or store.record.plan.size)
    check_batch_bytes(settings.batch_size, settings.size, "the student's batch")
    needs = method_class(settings.method).needs
    teacher = _live_teacher(job.online, job.teacher_id, store, dataset, needs, device) if job.online else cached_teacher(store, job.teacher_id, job.teacher_weights, needs)
    views = StoredViews(store, plan, None if teacher is None else teacher.num_views)
    if views.num_views == 0:
        raise UserError(f"store {store.path} has no complete view yet: finish `pipeline extract` first")
    check_repeats(settings, views)
    return DistillRun(settings, store, plan, dataset, val, views, teacher)


def _live_teacher(online: OnlineTeacher, teacher_id: str | None, store: Store, dataset: ImageDataset, needs, device) -> LiveTeacher:
    live = build_teacher(
        online.name, weights=online.weights, random_init=online.random_init, num_classes=dataset.num_classes, seed=online.seed,
        input_size=online.size or store.record.plan.size,
    )
    if "logits" in needs and live.num_classes != dataset.num_classes:
        raise UserError(f"teacher '{online.name}' predicts {live.num_classes} classes but the dataset has {dataset.num_classes}")
    # Class means (KD++) describe the teacher, so they come from its cache's statistics when the store has them.
    cached_id = teacher_id or default_teacher_id(online.name)
    means = stats.class_means(store, cached_id) if cached_id in store.teacher_ids() else None
    return LiveTeacher(live.to(device or "cpu"), needs, class_means=means)

