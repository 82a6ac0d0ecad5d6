"""Stage one: run a frozen teacher over recorded views and commit its outputs unit by unit.

The unit of work is one view of one block of samples. For each pending unit
the views are rendered (in loader workers, ahead of the teacher), the teacher
maps them to store rows (``TeacherRunner``), and the unit is written whole
and then committed. Committed units are skipped, so re-running the command
resumes; the plan's parameters and fingerprints are written by the first
teacher that renders a unit and checked by every later one.
"""

from __future__ import annotations

import logging
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from storage import ArraySpec, CommittedUnits, Store, UserError

from . import cache
from .datasets import ImageDataset
from .progress import Progress
from .replay import StoredViews, Table, ViewRenderer, concat, even_batches, render_batches, with_partner_params
from .teachers import Teacher
from .views import ViewPlan, ViewRecipe, normalize

log = logging.getLogger(__name__)

FINGERPRINT = ArraySpec((), "uint32")


def library_versions() -> dict:
    import PIL
    import timm
    import torchvision
    import zarr

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "zarr": zarr.__version__,
    }


def open_store(path, dataset: ImageDataset, plan: ViewPlan, *, views: int, block: int, size: int) -> Store:
    """Create the store for (dataset, plan), or reopen it after checking it was made from them."""
    if not Store.exists(path):
        meta = {
            "dataset": dataset.describe(),
            "plan": {**plan.describe(), "size": size},
            "versions": library_versions(),
        }
        specs = {**plan.fields, "fingerprint": FINGERPRINT}
        return Store.create(path, meta=meta, num_samples=len(dataset), num_views=views, block=block, plan_specs=specs)
    store = Store(path)
    check_dataset(store, dataset)
    check_plan(store, plan)
    return store


def check_dataset(store: Store, dataset: ImageDataset) -> None:
    made = store.meta["dataset"]
    if made["fingerprint"] != dataset.fingerprint():
        raise UserError(
            f"store {store.path} was made from dataset {made['source']} ({made['num_samples']} samples, "
            f"fingerprint {made['fingerprint'][:12]}), not {dataset.source} ({len(dataset)} samples, "
            f"fingerprint {dataset.fingerprint()[:12]}): use the same --data, or a new --store"
        )


def check_plan(store: Store, plan: ViewPlan) -> None:
    made = store.meta["plan"]
    if made["recipe"] != plan.recipe.to_dict() or made["seed"] != plan.seed:
        raise UserError(
            f"store {store.path} was made with view plan seed {made['seed']} recipe {made['recipe']}, "
            f"not seed {plan.seed} recipe {plan.recipe.to_dict()}: use the same view settings, or a new --store"
        )


def stored_plan(store: Store) -> ViewPlan:
    """The view plan a store was made with."""
    made = store.meta["plan"]
    return ViewPlan(ViewRecipe.from_dict(made["recipe"]), made["seed"])


class TeacherRunner:
    """Batch inference: holds a frozen teacher, maps rendered uint8 views to store rows.

    Loads nothing per call and keeps no state between calls, so it can live in a
    worker (a Ray actor, later) and be called with any unit in any order.
    """

    def __init__(self, teacher: Teacher, info: dict, device: str = "cpu"):
        self.teacher, self.info, self.device = teacher.to(device), info, device

    def __call__(self, views: torch.Tensor, labels: torch.Tensor) -> dict[str, np.ndarray]:
        x = normalize(views, self.teacher.mean, self.teacher.std).to(self.device)
        # bf16: autocast runs matmuls and convolutions in bfloat16; the outputs are encoded from float32.
        bf16 = self.info.get("precision") == "bf16"
        with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=bf16):
            raw = self.teacher(x, self.info["outputs"])  # tokens only when stored
        return cache.encode({k: v.float().cpu() for k, v in raw.items()}, labels, self.info)


PRECISIONS = ("fp32", "bf16")


def teacher_info(teacher: Teacher, outputs_info: dict, store_format: str = "zarr", precision: str = "fp32") -> dict:
    """teacher.json: what made the cached arrays; re-runs must match it. store_format: zarr or wds."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    return {
        "format": store_format,
        "precision": precision,  # the teacher's arithmetic: bf16 outputs differ from fp32 ones in the 3rd digit
        "name": teacher.spec.name,
        "timm_name": teacher.spec.timm_name,
        "weights": teacher.weights,
        "input_size": teacher.input_size,
        "mean": list(teacher.mean),
        "std": list(teacher.std),
        **outputs_info,
        "versions": library_versions(),
    }


# Fields that must agree for two extractions to share one teacher group.
_MUST_MATCH = ("timm_name", "weights", "input_size", "outputs", "logits", "k", "dtype", "feature_dtype", "num_classes", "format", "precision")


def check_classes(info: dict, num_classes: int) -> None:
    if "logits" in info["outputs"] and info["num_classes"] != num_classes:
        raise UserError(
            f"teacher '{info['name']}' predicts {info['num_classes']} classes but the dataset has {num_classes}: "
            "use weights trained on these classes, or --outputs features"
        )


def open_teacher(store: Store, teacher_id: str, info: dict, num_classes: int, views: int) -> CommittedUnits:
    """Check ``info`` against the store and any earlier extraction, then grow the store to ``views``."""
    check_classes(info, num_classes)
    if teacher_id in store.teacher_ids():
        made = cache.with_defaults(store.teacher_info(teacher_id))  # older teacher.json: features in dtype
        made.setdefault("format", "zarr")  # teacher.json from before wds: zarr
        made.setdefault("precision", "fp32")  # from before --precision: fp32
        diff = [k for k in _MUST_MATCH if made.get(k) != info.get(k)]
        if diff:
            raise UserError(
                f"store {store.path} already holds teacher '{teacher_id}' with other {', '.join(diff)} "
                f"({', '.join(f'{k}={made.get(k)}' for k in diff)}): pass --teacher-id NAME to store this one beside it"
            )
        views = max(views, made["views"])
    if views > store.num_views:
        log.info("store %s: adding views %d..%d", store.path, store.num_views, views - 1)
        store.add_views(views)
    # The teacher's own view count: distillation needs every unit below it.
    return store.create_teacher(teacher_id, {**info, "views": views}, cache.array_specs(info))


@dataclass
class ExtractResult:
    units: int
    skipped: int
    views: int
    seconds: float


class UnitExtractor:
    """Computes and commits single (view, block) units of one teacher: what a worker holds.

    ``run(view, block)`` does one unit by itself (an actor calls it with any
    unit, in any order, any number of times: the commit protocol makes a repeat
    harmless); ``extract`` streams many units through the same pieces with
    rendering ahead and a background writer.
    """

    def __init__(self, store: Store, dataset: ImageDataset, runner: TeacherRunner, teacher_id: str, *, batch_size: int = 64, workers: int = 0):
        self.store, self.dataset, self.runner = store, dataset, runner
        self.batch_size, self.workers = batch_size, workers
        self.plan = stored_plan(store)
        self.source = StoredViews(store, self.plan, store.num_views)
        self.group = store.teacher(teacher_id)  # created by open_teacher before any unit runs
        self.param_names = list(self.plan.fields)
        self.sizes = dataset.sizes()
        self.renderer = ViewRenderer(dataset, self.plan, (runner.teacher.input_size,), store.meta["plan"]["size"])

    def unit_table(self, v: int, b: int, plan_stored: bool) -> Table:
        """The unit's rows and view parameters: read from the plan when stored, else drawn (same values)."""
        ids = self.source.ids(b)
        if plan_stored:
            table = self.source.params(v, b)
        else:
            table = {**self.plan.draw(v, ids, self.sizes[ids]), "fingerprint": np.zeros(len(ids), np.uint32)}
        table.update(id=ids, view=np.full(len(ids), v), label=self.dataset.labels[ids], unit=np.full(len(ids), b))
        table["check"] = np.ones(len(ids), bool)
        return with_partner_params(table, self.param_names)  # a mixing partner is in the same unit

    def batches(self, tables) -> Iterator[Table]:
        for table in tables:
            yield from even_batches(table, self.batch_size)

    def render(self, v: int, b: int) -> tuple[bool, list[tuple[Table, dict]]]:
        """Render one unit's views (no teacher): what a worker does ahead of the teacher."""
        plan_stored = self.source.group.is_committed(v, b)
        table = self.unit_table(v, b, plan_stored)
        rendered = render_batches(self.renderer, self.batches([table]), self.param_names, self.workers, check_column="check")
        return plan_stored, list(rendered)

    def infer(self, batch: Table, rendered: dict) -> tuple[Table, np.ndarray, dict]:
        """Teacher rows of one rendered batch, with the views' fingerprints."""
        labels = target_class(batch, self.dataset.labels, rendered["lam"][:, 0].numpy())
        rows = self.runner(rendered["views"][0], torch.from_numpy(labels))
        return batch, rendered["fingerprint"].numpy().astype(np.uint32), rows

    def commit(self, v: int, b: int, parts: list, plan_stored: bool) -> None:
        _commit_unit(self.store, self.source, self.group, v, b, parts, plan_stored, self.param_names)

    def run(self, v: int, b: int, rendered: tuple[bool, list] | None = None) -> int:
        """Render (unless ``rendered`` is given), run the teacher, write and commit one unit; its row count."""
        plan_stored, batches = rendered if rendered is not None else self.render(v, b)
        self.commit(v, b, [self.infer(batch, r) for batch, r in batches], plan_stored)
        return len(self.source.ids(b))


def pending_units(store: Store, teacher_id: str, views: int) -> list[tuple[int, int]]:
    """Units still to do, view-major. A unit whose plan record is gone (repair took it back) is redone
    with it: extraction writes the plan."""
    done, plan_done = store.teacher(teacher_id).committed(), store.plan.committed()
    return [(v, b) for v in range(views) for b in range(store.num_blocks) if (v, b) not in done or (v, b) not in plan_done]


def extract(
    store: Store,
    dataset: ImageDataset,
    runner: TeacherRunner,
    teacher_id: str,
    *,
    views: int,
    batch_size: int = 64,
    workers: int = 0,
) -> ExtractResult:
    """Extract ``views`` views of every sample into ``store`` under ``teacher_id``; resumable."""
    open_teacher(store, teacher_id, runner.info, dataset.num_classes, views)
    units = pending_units(store, teacher_id, views)
    skipped = views * store.num_blocks - len(units)
    if skipped:
        log.info("teacher %s: %d units already committed, %d to do", teacher_id, skipped, len(units))
    unit = UnitExtractor(store, dataset, runner, teacher_id, batch_size=batch_size, workers=workers)
    total_views = sum(len(unit.source.ids(b)) for _, b in units)
    progress = Progress(f"extract {teacher_id}", total_views)
    plan_done = unit.source.group.committed()

    def commit(v, b, parts):
        unit.commit(v, b, parts, (v, b) in plan_done)
        progress.update(len(unit.source.ids(b)))

    start = time.perf_counter()
    parts: list[tuple[Table, np.ndarray, dict]] = []
    tables = (unit.unit_table(v, b, (v, b) in plan_done) for v, b in units)
    # Loader workers render ahead of the teacher; one writer thread compresses, writes and commits a
    # unit while the teacher runs on the next (the codecs release the GIL). At most one unit waits,
    # and waiting on it re-raises its error.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="unit-writer") as writer:
        pending = None
        for batch, rendered in render_batches(unit.renderer, unit.batches(tables), unit.param_names, workers, check_column="check"):
            parts.append(unit.infer(batch, rendered))
            v, b = int(batch["view"][0]), int(batch["unit"][0])
            if sum(len(p[0]["id"]) for p in parts) == len(unit.source.ids(b)):
                if pending is not None:
                    pending.result()
                pending, parts = writer.submit(commit, v, b, parts), []
        if pending is not None:
            pending.result()
    return ExtractResult(len(units), skipped, total_views, time.perf_counter() - start)


def target_class(batch: Table, labels: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """The class of the (mixed) target: the partner's label where the partner has the larger share."""
    if "mix_partner" not in batch:
        return batch["label"]
    partner = batch["mix_partner"]
    return np.where((partner >= 0) & (lam < 0.5), labels[np.maximum(partner, 0)], batch["label"])


def _commit_unit(store, source, group, v, b, parts, plan_stored: bool, param_names) -> None:
    table = concat([p[0] for p in parts])
    prints = np.concatenate([p[1] for p in parts])
    if plan_stored:
        bad = np.flatnonzero(prints != table["fingerprint"])
        if len(bad):
            i = int(table["id"][bad[0]])
            raise UserError(
                f"view {v} of sample {i} renders differently now than when the store's plan was written "
                f"({len(bad)} of {len(prints)} views in this unit differ): the image data or an imaging library changed; "
                f"compare versions in {store.path}/store.json with this environment"
            )
    else:
        # A duplicate of this unit may write the same plan unit at the same time: the bytes are the same.
        source.group.write_unit(v, b, {**{k: table[k] for k in param_names}, "fingerprint": prints})
    rows = {k: np.concatenate([p[2][k] for p in parts]) for k in parts[0][2]}
    group.write_unit(v, b, rows)
