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
from dataclasses import MISSING, dataclass, field

from storage import CommittedUnits, Store, TeacherRecord, UserError, list_backends
from storage.names import check_name
from storage.teacher_record import DTYPES, FEATURE_DTYPES, PRECISIONS

from ..cache.store_setup import check_dataset, check_plan, create_store, stored_plan
from ..cache.teacher_rows import output_info
from ..data.datasets import ImageDataset, open_dataset
from ..data.views import ViewPlan, ViewRecipe
from ..settings import (
    MAX_BATCH,
    MAX_BLOCK,
    MAX_VIEWS,
    SEED,
    SIZE,
    WORKERS,
    Check,
    Choice,
    Device,
    Flag,
    Int,
    Location,
    ModelArgs,
    Name,
    Optional,
    Text,
    build,
    check_batch_bytes,
    setting,
)
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


class Backend(Check):
    """A store backend registered now (``storage.list_backends``: plug-ins register theirs on import)."""

    @property
    def what(self) -> str:
        return "one of " + ", ".join(list_backends())

    def check(self, value):
        if value not in list_backends():
            raise ValueError
        return value


class Outputs(Check):
    """Outputs to store, ``logits,features`` on the command line; which ones a teacher has is checked against it."""

    what = "a list of output names: logits, features, tokens"

    def parse(self, text):
        return [part.strip() for part in text.split(",")]

    def check(self, value):
        if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
            raise TypeError
        return tuple(Text().check(v) for v in value)


@dataclass
class ExtractJob:
    """Everything that makes an extraction what it is, as plain values (``None``: the component's own default).

    Each field is declared once (``stages.settings.setting``): `pipeline extract`'s flags, their checks, defaults
    and help come from here, and `distill --online` takes its teacher's weight flags from the same fields."""

    store: str = setting(
        MISSING,
        Location(),
        "store directory or fsspec URL (s3://bucket/path); created on first use, resumed or extended later",
    )
    data: str = setting(MISSING, Text(), "training data")  # the command's help names the dataset kinds
    teacher: str = setting(
        MISSING,
        Text(),
        "short name, any timm model, or a timm model folder (local-dir:PATH, hf-hub:REPO)",  # the command lists the names
    )
    views: int = setting(MISSING, Int(1, MAX_VIEWS), "views per sample; more than the store has appends views")
    teacher_id: str | None = setting(
        None,
        Optional(Name()),
        "name of the teacher inside the store",
        show_default="--teacher as a plain name; a local-dir: folder's own name",
    )
    weights: str | None = setting(
        None,
        Optional(Text()),
        "teacher weights: a safetensors file or torch checkpoint",
        show_default="the hub weights of the teacher, or a model folder's own",
    )
    random_init: bool = setting(False, Flag(), "random teacher weights from --teacher-seed, for tests")
    teacher_seed: int = setting(0, SEED, "seed of a --random-init teacher; the same seed builds the same teacher")
    model_args: dict = setting(
        None,
        ModelArgs(),
        "extra timm.create_model argument of the teacher, KEY=VALUE with a YAML value, e.g. channels=[8,16,32,64], as "
        "`train` was given it (repeatable); over a model folder's own; recorded in teacher.json, so every extraction "
        "into one teacher id must give the same",
        flag="--model-arg",
        factory=dict,
        show_default="none",
    )
    size: int | None = setting(
        None, Optional(SIZE), "render size of the teacher's views", show_default="the teacher's input size"
    )
    block: int | None = setting(
        None,
        Optional(Int(1, MAX_BLOCK)),
        "samples per shard, the unit of work, fixed when a store is made",
        show_default=f"{BLOCK} for a new store; an existing one keeps its own",
    )
    # The view settings given (flags over YAML), over the store's recipe or the defaults; --plan-seed: None is an
    # existing store's seed, else 0. Both come from the view flags every view-making command shares.
    view_settings: dict = field(default_factory=dict)
    plan_seed: int | None = None
    # What is stored and how (``teacher_rows.output_info``).
    outputs: tuple[str, ...] | None = setting(
        None,
        Optional(Outputs()),
        "comma-separated outputs to store: logits, features, tokens (CLS and patch tokens, large: the cost is logged first)",
        show_default="all the teacher has except tokens",
    )
    logits: str = setting("topk", Choice(("topk", "full")), "store top-k logits or all of them")
    topk: int | None = setting(
        None,
        Optional(Int(1, 1 << 20)),
        "k for --logits topk, at most the teacher's class count",
        show_default=f"{TOPK}, or every class when fewer",
    )
    dtype: str = setting("float16", Choice(DTYPES), "stored float type; float32 stores are exact")
    feature_dtype: str | None = setting(
        None,
        Optional(Choice(FEATURE_DTYPES)),
        "stored type of features and tokens; int8 keeps a float32 scale per vector, about 1 byte per value",
        show_default="the --dtype value",
    )
    format: str = setting(
        "zarr",
        Backend(),
        "how teacher outputs are stored (a store backend): zarr arrays, or wds: one webdataset tar per (view, block) "
        "unit, for streaming; fixed per teacher id",
    )
    precision: str = setting(
        "fp32",
        Choice(PRECISIONS),
        "the teacher's arithmetic: bf16 autocast is the fast choice on GPUs that have it; recorded in teacher.json, and "
        "every extraction into one teacher id must use the same",
    )
    # How the work is done (not recorded in the store: any value makes the same bytes).
    batch_size: int = setting(TEACHER_BATCH, Int(1, MAX_BATCH), "teacher batch size")
    workers: int = setting(
        0, WORKERS, "loader processes rendering views ahead of the teacher (per Ray actor with --actors)"
    )
    # None in a job: decided where the job runs (a Ray actor's own device)
    device: str | None = setting(
        None,
        Optional(Device()),
        "where the teacher runs, e.g. cuda, cuda:1, cpu",
        show_default="cuda when available, else cpu; on Ray: cuda for GPU actors, else cpu",
    )

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
