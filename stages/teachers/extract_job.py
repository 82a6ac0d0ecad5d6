"""An extraction as one typed, serialisable description, and the one builder that makes it ready to run.

``ExtractJob`` says what an extraction is: the data, the teacher (name, weights or a seeded random
initialisation, render size, id in the store), what is stored and how, the store, how many views,
and how the work is done (batch size, loader workers, device). It holds plain values only, so the
command line makes it once from flags and YAML and a Ray actor receives the same object.

``prepare_extract`` turns a job into a ``ReadyExtract``: it opens the data, describes the teacher
(without its weights when it is only described: ``build_teacher(load=False)``), checks everything
against an existing store once (block, dataset fingerprint, view plan, the teacher's earlier record)
and builds the view plan once, all before a store directory exists or an existing one changes.
``ReadyExtract.open_store`` then makes (or takes) the store without checking it again, ``open_teacher``
creates the teacher's arrays, and ``run`` extracts in this process; a worker elsewhere builds what
it needs from the job alone (``worker_extractor``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from storage import CommittedUnits, Store, TeacherRecord, UserError
from storage.names import check_name

from ..cache.store_setup import check_dataset, check_plan, create_store, stored_plan
from ..cache.teacher_rows import output_info
from ..data.datasets import ImageDataset, open_dataset
from ..data.views import ViewPlan, ViewRecipe
from ..settings import build, check_batch_bytes
from .extract import (
    TEACHER_BATCH,
    ExtractResult,
    TeacherRunner,
    UnitExtractor,
    check_classes,
    check_teacher_record,
    extract_units,
    grow_teacher,
    teacher_info,
)
from .teachers import Teacher, build_teacher, default_teacher_id

BLOCK = 1024  # samples per shard of a new store
TOPK = 10  # logits kept by default (every class when the teacher has fewer)


@dataclass
class ExtractJob:
    """Everything that makes an extraction what it is, as plain values (``None``: the component's own default)."""

    store: str  # a directory or URL; created on first use, resumed or extended later
    data: str  # digits, folder:PATH, fake:N, wds:PATTERN
    teacher: str  # a short name, any timm model, or a timm model folder (local-dir:PATH, hf-hub:REPO)
    views: int  # views per sample; more than the store has appends views
    teacher_id: str | None = None  # the teacher's name inside the store; None: ``default_teacher_id(teacher)``
    weights: str | None = None  # a local file; None: the hub weights (or random_init)
    random_init: bool = False  # random weights from teacher_seed (tests)
    teacher_seed: int = 0
    model_args: dict = field(
        default_factory=dict
    )  # extra timm.create_model arguments (--model-arg), recorded in teacher.json
    size: int | None = None  # render size; None: the teacher's input size
    block: int | None = None  # samples per shard; None: BLOCK for a new store, an existing store's own
    view_settings: dict = field(
        default_factory=dict
    )  # the view settings given (flags over YAML), over the store's recipe or the defaults
    plan_seed: int | None = None  # None: an existing store's, else 0
    # What is stored and how (``teacher_rows.output_info``).
    outputs: tuple[str, ...] | None = None  # None: every output the teacher has but tokens
    logits: str = "topk"  # or "full"
    topk: int | None = None  # None: TOPK, or every class when the teacher has fewer
    dtype: str = "float16"
    feature_dtype: str | None = None  # None: dtype
    format: str = "zarr"  # a store backend (storage.list_backends)
    precision: str = "fp32"  # or "bf16"
    # How the work is done (not recorded in the store: any value makes the same bytes).
    batch_size: int = TEACHER_BATCH
    workers: int = 0  # loader processes rendering views ahead of the teacher
    device: str | None = None  # None: decided where the job runs (a Ray actor's own device)

    def __post_init__(self):
        if self.outputs is not None:
            self.outputs = tuple(self.outputs)

    @property
    def id(self) -> str:
        return self.teacher_id or default_teacher_id(self.teacher)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExtractJob:
        return cls(**d)

    def replace(self, **changes) -> ExtractJob:
        return dataclasses.replace(self, **changes)


def job_teacher(job: ExtractJob, num_classes: int, load: bool = True) -> Teacher:
    """The job's teacher; ``load=False``: described only, on torch's meta device (no weights read)."""
    return build_teacher(
        job.teacher,
        weights=job.weights,
        random_init=job.random_init,
        num_classes=num_classes,
        seed=job.teacher_seed,
        input_size=job.size,
        load=load,
        model_args=job.model_args,
    )


@dataclass
class ReadyExtract:
    """A job made ready: its data, teacher and record, view plan and block, checked against the store once."""

    job: ExtractJob
    dataset: ImageDataset
    teacher: Teacher  # on torch's meta device when prepared without loading: for its record only
    info: TeacherRecord  # teacher.json, before its view count
    plan: ViewPlan
    block: int
    store: Store | None  # the existing store (checked); None until ``open_store`` makes a new one
    made: TeacherRecord | None  # the record of an earlier extraction into the teacher's id, which ``info`` agrees with

    def open_store(self) -> Store:
        """The store: the existing one as checked, else a new one (checked now if another process made it meanwhile,
        against the plan built for a new store)."""
        if self.store is None:
            if Store.exists(self.job.store):
                self.check_store(Store(self.job.store))
            else:
                self.store = create_store(
                    self.job.store,
                    self.dataset,
                    self.plan,
                    views=self.job.views,
                    block=self.block,
                    size=self.info.input_size,
                )
        return self.store

    def open_teacher(self) -> CommittedUnits:
        """Create (or reopen) the teacher's arrays and grow the store to the job's views; hold the teacher's lock."""
        return grow_teacher(self.open_store(), self.job.id, self.info, self.job.views, self.made)

    def run(self) -> ExtractResult:
        """Extract in this process (the teacher must be loaded), holding the teacher's lock."""
        self.open_teacher()
        runner = TeacherRunner(self.teacher, self.info, self.job.device or "cpu")
        job = self.job
        return extract_units(
            self.open_store(),
            self.dataset,
            runner,
            job.id,
            views=job.views,
            batch_size=job.batch_size,
            workers=job.workers,
        )

    def check_store(self, store: Store) -> None:
        """Check ``store`` against the job (block, data, view plan, the teacher's earlier record), once, and take its block."""
        if self.job.block is not None and self.job.block != store.block:
            raise UserError(
                f"store {store.path} has blocks of {store.block} samples, fixed when it was made: "
                f"leave --block out (or pass --block {store.block}), or extract into a new --store"
            )
        self.block = store.block
        check_dataset(store, self.dataset)
        check_plan(store, self.plan)
        self.made = check_teacher_record(store, self.job.id, self.info)
        self.store = store


def job_plan(job: ExtractJob, store: Store | None) -> ViewPlan:
    """The view plan: the job's view settings over the store's recipe (or the defaults), with its seed (or the store's, or 0)."""
    base = stored_plan(store).recipe if store is not None else ViewRecipe()
    recipe = (
        base if not job.view_settings else build(ViewRecipe, {**base.to_dict(), **job.view_settings}, "view settings")
    )
    seed = job.plan_seed if job.plan_seed is not None else (store.record.plan.seed if store is not None else 0)
    return ViewPlan(recipe, seed)


def prepare_extract(job: ExtractJob, *, load: bool = True) -> ReadyExtract:
    """Everything the job names, opened and checked once, before a store directory exists or an existing one changes.

    ``load=False``: the teacher is described without its weights (a Ray driver, whose actors load it).
    """
    check_name(job.id, "teacher id (--teacher-id)")
    dataset = open_dataset(job.data)
    teacher = job_teacher(job, dataset.num_classes, load)
    info = job_record(job, teacher)
    check_classes(info, dataset.num_classes)
    if teacher.input_size:
        check_batch_bytes(job.batch_size, teacher.input_size, "the teacher's batch")
    existing = Store(job.store) if Store.exists(job.store) else None
    ready = ReadyExtract(job, dataset, teacher, info, job_plan(job, existing), job.block or BLOCK, None, None)
    if existing is not None:
        ready.check_store(existing)
    return ready


def job_record(job: ExtractJob, teacher: Teacher) -> TeacherRecord:
    """teacher.json (before its view count) of ``teacher`` stored as the job says."""
    outputs = list(job.outputs) if job.outputs else None
    stored = output_info(
        teacher,
        logits=job.logits,
        k=_topk(job, teacher),
        dtype=job.dtype,
        feature_dtype=job.feature_dtype,
        outputs=outputs,
    )
    return teacher_info(teacher, stored, job.format, job.precision)


def _topk(job: ExtractJob, teacher: Teacher) -> int:
    """k of stored top-k logits: the job's, at most the teacher's class count; by default TOPK (or every class when fewer)."""
    if job.topk is None:
        return min(TOPK, teacher.num_classes) if teacher.num_classes else TOPK
    if job.logits == "topk" and teacher.num_classes and job.topk > teacher.num_classes:
        raise UserError(
            f"--topk {job.topk} is more than the {teacher.num_classes} classes teacher '{teacher.spec.name}' predicts: "
            f"pass --topk {teacher.num_classes} or less, or --logits full"
        )
    return job.topk


def worker_extractor(job: ExtractJob) -> UnitExtractor:
    """What a worker (a Ray actor) holds, built from the job alone once the driver has made the store and the
    teacher's arrays: its own view of the data and of the weights, checked to be the ones the store records."""
    store = Store(job.store)
    dataset = open_dataset(job.data)
    if dataset.fingerprint() != store.record.dataset.fingerprint:
        raise UserError(
            f"dataset {job.data} differs on this node from the one store {store.path} was made from: every node must see the same data"
        )
    info = store.teacher_info(job.id)
    teacher = job_teacher(job, dataset.num_classes)
    if teacher.weights != info.weights:
        raise UserError(
            f"teacher weights differ on this node ({teacher.weights}, in the store: {info.weights}): every node must see the same file"
        )
    runner = TeacherRunner(teacher, info, job.device or "cpu")
    return UnitExtractor(store, dataset, runner, job.id, batch_size=job.batch_size, workers=job.workers)
