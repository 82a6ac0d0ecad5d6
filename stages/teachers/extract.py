"""Stage one: run a frozen teacher over recorded views and commit its outputs unit by unit.

The unit of work is one view of one block of samples. For each pending unit
the views are rendered (in loader workers, ahead of the teacher), the teacher
maps them to store rows (``TeacherRunner``), and the unit is written whole
and then committed. A run that extracts several views of a block renders the
same teacher batch of each view together (``block_batches``), so each image is
decoded once for all of them; the teacher still sees each unit's own batches. Committed units are skipped, so re-running the command
resumes; the plan's parameters and fingerprints are written by the first
teacher that renders a unit and checked by every later one.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby, zip_longest
from typing import Iterable, Iterator

import numpy as np
import torch

from storage import CommittedUnits, Store, TeacherRecord, UserError
from storage.teacher_record import PRECISIONS

from ..cache import teacher_rows
from ..data.datasets import ImageDataset
from ..progress import Progress
from ..data.replay import (
    IMAGES,
    StoredViews,
    Table,
    ViewRenderer,
    check_fingerprints,
    concat,
    even_batches,
    render_batches,
    take,
    unit_table,
    with_images,
)
from ..cache.store_setup import library_versions, stored_plan
from .teachers import Teacher
from ..data.views import normalize

log = logging.getLogger(__name__)


class TeacherRunner:
    """Batch inference: holds a frozen teacher, maps rendered uint8 views to store rows.

    Loads nothing per call and keeps no state between calls, so it can live in a
    worker (a Ray actor, later) and be called with any unit in any order.
    """

    def __init__(self, teacher: Teacher, info: TeacherRecord, device: str = "cpu"):
        self.teacher, self.info, self.device = teacher.to(device), info, device

    def __call__(self, views: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
        x = normalize(views, self.teacher.mean, self.teacher.std).to(self.device)
        # bf16: autocast runs matmuls and convolutions in bfloat16; the outputs are encoded from float32.
        bf16 = self.info.precision == "bf16"
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=bf16):
            raw = self.teacher(x, self.info.outputs)  # tokens only when stored
        return teacher_rows.encode({k: v.float().cpu() for k, v in raw.items()}, labels, self.info)


def teacher_info(
    teacher: Teacher, outputs_info: dict, store_format: str = "zarr", precision: str = "fp32"
) -> TeacherRecord:
    """teacher.json: what made the cached arrays; re-runs must match it.

    outputs_info: what is stored and how (``teacher_rows.output_info``); store_format: a store backend (zarr, wds).
    """
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    return TeacherRecord(
        format=store_format,
        precision=precision,
        name=teacher.spec.name,
        timm_name=teacher.spec.timm_name,
        model_args=teacher.model_args,
        weights=teacher.weights,
        input_size=teacher.input_size,
        mean=teacher.mean,
        std=teacher.std,
        **outputs_info,
        versions=library_versions(),
    )


# Fields that must agree for two extractions to share one teacher group.
TEACHER_BATCH = 64  # views per teacher forward pass: the one default of extraction's --batch-size
_MUST_MATCH = (
    "timm_name",
    "model_args",
    "weights",
    "input_size",
    "outputs",
    "logits",
    "k",
    "dtype",
    "feature_dtype",
    "num_classes",
    "format",
    "precision",
)


def check_classes(info: TeacherRecord, num_classes: int) -> None:
    if "logits" in info.outputs and info.num_classes != num_classes:
        raise UserError(
            f"teacher '{info.name}' predicts {info.num_classes} classes but the dataset has {num_classes}: "
            "use weights trained on these classes, or --outputs features"
        )


def check_teacher_record(store: Store, teacher_id: str, info: TeacherRecord) -> TeacherRecord | None:
    """The record of an earlier extraction into ``teacher_id`` (None if there is none), refused unless ``info`` agrees with it."""
    if teacher_id not in store.teacher_ids():
        return None
    made = store.teacher_info(teacher_id)
    diff = [k for k in _MUST_MATCH if getattr(made, k) != getattr(info, k)]
    if diff:
        earlier = made.to_dict()
        raise UserError(
            f"store {store.path} already holds teacher '{teacher_id}' with other {', '.join(diff)} "
            f"({', '.join(f'{k}={earlier.get(k)}' for k in diff)}): pass --teacher-id NAME to store this one beside it"
        )
    return made


def open_teacher(store: Store, teacher_id: str, info: TeacherRecord, num_classes: int, views: int) -> CommittedUnits:
    """Check ``info`` against the store and any earlier extraction, then grow the store to ``views``."""
    check_classes(info, num_classes)
    return grow_teacher(store, teacher_id, info, views, check_teacher_record(store, teacher_id, info))


def grow_teacher(
    store: Store, teacher_id: str, info: TeacherRecord, views: int, made: TeacherRecord | None
) -> CommittedUnits:
    """Create the teacher's arrays (or reopen them) and grow the store to ``views``, after ``info`` was checked
    against ``made``, the record of the earlier extraction into ``teacher_id`` (None: there was none).

    Call it holding the teacher's lock: the record is read again here for its view count, which only grows.
    """
    if made is None and teacher_id in store.teacher_ids():
        raise UserError(
            f"teacher '{teacher_id}' appeared in {store.path} while this extraction was starting (another `pipeline extract` made it): "
            "run the same command again, to be checked against it"
        )
    if made is not None:
        views = max(views, store.teacher_info(teacher_id).views)
    if views > store.num_views:
        log.info("store %s: adding views %d..%d", store.path, store.num_views, views - 1)
        store.add_views(views)
    # The teacher's own view count: distillation needs every unit below it.
    return store.create_teacher(teacher_id, info.replace(views=views), teacher_rows.array_specs(info))


@dataclass
class ExtractResult:
    units: int
    skipped: int
    views: int
    seconds: float


class UnitExtractor:
    """Computes and commits (view, block) units of one teacher: what a worker holds.

    ``run(units)`` does some units by itself, usually one block's views (an actor
    calls it with any units, in any order, any number of times: the commit protocol
    makes a repeat harmless); ``extract`` streams every unit through the same pieces
    with rendering ahead and a background writer.
    """

    def __init__(
        self,
        store: Store,
        dataset: ImageDataset,
        runner: TeacherRunner,
        teacher_id: str,
        *,
        batch_size: int = TEACHER_BATCH,
        workers: int = 0,
    ):
        self.store, self.dataset, self.runner = store, dataset, runner
        self.batch_size, self.workers = batch_size, workers
        self.plan = stored_plan(store)
        self.source = StoredViews(store, self.plan, store.num_views)
        self.group = store.teacher(teacher_id)  # created by open_teacher before any unit runs
        self.param_names = list(self.plan.fields)
        self.sizes = dataset.sizes()
        self.renderer = ViewRenderer(dataset, self.plan, (runner.teacher.input_size,), store.record.plan.size)

    def unit_table(self, v: int, b: int, plan_stored: bool, images: np.ndarray | None = None) -> Table:
        """The unit's rows and view parameters: read from the plan when stored, else drawn (same values).

        ``images``: the block's encoded images when another view of it read them already (``IMAGES``)."""
        params = None
        if not plan_stored:
            ids = self.source.ids(b)
            params = {**self.plan.draw(v, ids, self.sizes[ids]), "fingerprint": np.zeros(len(ids), np.uint32)}
        table = unit_table(self.source, v, b, self.dataset.labels, self.param_names, params=params)
        table = with_images(table if images is None else {**table, IMAGES: images}, self.dataset)
        n = len(table["id"])
        # "row": batching keeps mates together and so reorders rows; the commit puts them back in block order.
        return {**table, "unit": np.full(n, b), "check": np.ones(n, bool), "row": np.arange(n)}

    def batches(self, tables) -> Iterator[Table]:
        for table in tables:
            yield from even_batches(table, self.batch_size)

    def block_batches(self, units: list[tuple[int, int]], plan_done) -> Iterator[Table]:
        """Render batches of ``units``, block by block: the j-th teacher batch of each of a block's views side by side
        (``PART`` numbers them), so that the renderer decodes each image once for every view of the block. Split
        with ``split_parts``, the teacher batches are those of each unit alone: the same rows, the same results."""
        for b, same_block in groupby(sorted(units, key=lambda u: (u[1], u[0])), key=lambda u: u[1]):
            tables, images = [], None
            for v, _ in same_block:
                tables.append(self.unit_table(v, b, (v, b) in plan_done, images))
                images = tables[-1].get(IMAGES)  # a shard source reads the block's images once
            for parts in zip_longest(*(list(self.batches([t])) for t in tables)):
                parts = [p for p in parts if p is not None]
                yield concat([{**p, PART: np.full(len(p["id"]), k)} for k, p in enumerate(parts)])

    def render(self, units: list[tuple[int, int]], plan_done: set | None = None) -> Iterator[tuple[Table, dict]]:
        """Render batches of ``units`` (no teacher), one decode per image for all views of a block: what runs ahead of the teacher.

        ``plan_done``: the plan's committed units, when the caller has read them already."""
        plan_done = self.source.group.committed() if plan_done is None else plan_done
        return render_batches(
            self.renderer, self.block_batches(units, plan_done), self.param_names, self.workers, check_column="check"
        )

    def infer(self, batch: Table, rendered: dict) -> tuple[Table, np.ndarray, dict]:
        """Teacher rows of one rendered batch, with the views' fingerprints."""
        labels = target_class(batch, self.dataset.labels, rendered["lam"][:, 0].numpy())
        rows = self.runner(rendered["views"][0], torch.from_numpy(labels))
        return batch, rendered["fingerprint"].numpy().astype(np.uint32), rows

    def completed(self, rendered: Iterable[tuple[Table, dict]], on_batch=None) -> Iterator[tuple[int, int, list]]:
        """Run the teacher on each teacher batch of ``rendered`` (``render``'s) and yield ``(view, block, parts)``
        for each unit as its last batch is done; ``on_batch(rows)`` after each batch."""
        parts: dict[tuple[int, int], list[tuple[Table, np.ndarray, dict]]] = {}
        for shared, both in rendered:
            for batch, part in split_parts(shared, both):
                v, b = int(batch["view"][0]), int(batch["unit"][0])
                done = parts.setdefault((v, b), [])
                done.append(self.infer(batch, part))
                if on_batch is not None:
                    on_batch(len(batch["id"]))
                if sum(len(p[0]["id"]) for p in done) == len(self.source.ids(b)):
                    yield v, b, parts.pop((v, b))

    def commit(self, v: int, b: int, parts: list, plan_stored: bool) -> None:
        _commit_unit(self.store, self.source, self.group, v, b, parts, plan_stored, self.param_names)

    def run(self, units: list[tuple[int, int]], rendered: Iterable[tuple[Table, dict]] | None = None) -> int:
        """Render (unless ``rendered``, from ``render(units)``, is given), run the teacher, write and commit ``units``; their row count."""
        # read before rendering: a unit whose plan this run writes is checked against nothing
        plan_done = self.source.group.committed()
        for v, b, parts in self.completed(rendered if rendered is not None else self.render(units, plan_done)):
            self.commit(v, b, parts, (v, b) in plan_done)
        return sum(len(self.source.ids(b)) for _, b in units)


def pending_units(store: Store, teacher_id: str, views: int) -> list[tuple[int, int]]:
    """Units still to do, view-major. A unit whose plan record is gone (repair took it back) is redone
    with it: extraction writes the plan."""
    done, plan_done = store.teacher(teacher_id).committed(), store.plan.committed()
    return [u for u in store.units(views) if u not in done or u not in plan_done]


def extract(
    store: Store,
    dataset: ImageDataset,
    runner: TeacherRunner,
    teacher_id: str,
    *,
    views: int,
    batch_size: int = TEACHER_BATCH,
    workers: int = 0,
) -> ExtractResult:
    """Check the teacher against ``store`` (``open_teacher``), then extract ``views`` views of every sample into it
    under ``teacher_id``; resumable."""
    open_teacher(store, teacher_id, runner.info, dataset.num_classes, views)
    return extract_units(store, dataset, runner, teacher_id, views=views, batch_size=batch_size, workers=workers)


def extract_units(
    store: Store,
    dataset: ImageDataset,
    runner: TeacherRunner,
    teacher_id: str,
    *,
    views: int,
    batch_size: int = TEACHER_BATCH,
    workers: int = 0,
) -> ExtractResult:
    """Extract the pending units of the first ``views`` views of a teacher whose arrays exist (``open_teacher``)."""
    units = pending_units(store, teacher_id, views)
    skipped = views * store.num_blocks - len(units)
    if skipped:
        log.info("teacher %s: %d units already committed, %d to do", teacher_id, skipped, len(units))
    unit = UnitExtractor(store, dataset, runner, teacher_id, batch_size=batch_size, workers=workers)
    total_views = sum(len(unit.source.ids(b)) for _, b in units)
    # Counted per teacher batch, not per committed unit: a big teacher on a CPU takes minutes per unit of 1,024
    # samples, and its first line must come within seconds (a unit commits shortly after its last batch).
    progress = Progress(f"extract {teacher_id}", total_views)
    plan_done = unit.source.group.committed()

    def commit(v, b, parts):
        unit.commit(v, b, parts, (v, b) in plan_done)

    start = time.perf_counter()
    # Loader workers render ahead of the teacher; one writer thread compresses, writes and commits a
    # unit while the teacher runs on the next (the codecs release the GIL). At most one unit waits,
    # and waiting on it re-raises its error.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="unit-writer") as writer:
        pending = None
        for v, b, parts in unit.completed(unit.render(units, plan_done), progress.update):
            if pending is not None:
                pending.result()
            pending = writer.submit(commit, v, b, parts)
        if pending is not None:
            pending.result()
    return ExtractResult(len(units), skipped, total_views, time.perf_counter() - start)


PART = "part"  # a render batch's teacher batches (``UnitExtractor.block_batches``)


def split_parts(batch: Table, rendered: dict) -> Iterator[tuple[Table, dict]]:
    """The teacher batches of a render batch (``PART``, each contiguous) with their share of the rendered views."""
    starts = np.flatnonzero(np.r_[True, batch[PART][1:] != batch[PART][:-1]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(batch[PART])]):
        rows = slice(int(lo), int(hi))
        yield (
            take(batch, rows),
            {
                "views": [v[rows] for v in rendered["views"]],
                "fingerprint": rendered["fingerprint"][rows],
                "lam": rendered["lam"][rows],
            },
        )


def target_class(batch: Table, labels: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """The class of the (mixed) target: the partner's label where the partner has the larger share."""
    if "mix_partner" not in batch:
        return batch["label"]
    partner = batch["mix_partner"]
    return np.where((partner >= 0) & (lam < 0.5), labels[np.maximum(partner, 0)], batch["label"])


def _commit_unit(store, source, group, v, b, parts, plan_stored: bool, param_names) -> None:
    table = concat([p[0] for p in parts])
    order = np.argsort(table["row"], kind="stable")  # the unit's rows in block order again
    table = take(table, order)
    prints = np.concatenate([p[1] for p in parts])[order]
    if plan_stored:
        check_fingerprints(table, prints, store)
    else:
        # A duplicate of this unit may write the same plan unit at the same time: the bytes are the same.
        source.group.write_unit(v, b, {**{k: table[k] for k in param_names}, "fingerprint": prints})
    rows = {k: np.concatenate([p[2][k] for p in parts])[order] for k in parts[0][2]}
    group.write_unit(v, b, rows)
