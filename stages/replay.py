"""Replaying recorded views: where they come from, in what order, and rendering them in parallel.

Data moves as *tables*: dicts of equal-length numpy columns (``id``, ``view``,
``label``, the view parameters, cached teacher rows ``t:<name>``...). A unit
table holds one (view, block) unit; the stages below turn a stream of unit
tables into shuffled fixed-size batch tables, and ``render_batches`` renders
each batch's images in loader workers while keeping the batch order, so the
result never depends on the number of workers.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import numpy as np
from torch.utils.data import DataLoader, Dataset

from storage import Store, UserError

from .datasets import ImageDataset
from .views import ViewPlan, fingerprint, row

Table = dict[str, np.ndarray]


# -- where view parameters come from ---------------------------------------------------------


class StoredViews:
    """Views as recorded in a store's plan (the authority for replay).

    ``num_views``: how many leading views to use; ``None`` takes every view whose
    parameters are committed for all blocks.
    """

    def __init__(self, store: Store, plan: ViewPlan, num_views: int | None = None):
        self.store, self.plan = store, plan
        self.group = store.plan
        self.num_blocks, self.block = store.num_blocks, store.block
        self.num_views = self.group.complete_views(self.num_blocks) if num_views is None else num_views
        self.names = [*plan.fields, "fingerprint"]

    def ids(self, block: int) -> np.ndarray:
        return np.asarray(self.store.block_range(block))

    def params(self, view: int, block: int) -> Table:
        return self.group.read_unit(view, block, self.names, rows=len(self.ids(block)))


class DrawnViews:
    """View parameters drawn on the fly from a plan (training without a store)."""

    def __init__(self, plan: ViewPlan, dataset: ImageDataset, num_views: int, block: int = 1024):
        self.plan, self.num_views, self.block = plan, num_views, block
        self.sizes = dataset.sizes()
        self.num_blocks = -(-len(dataset) // block)
        self.count = len(dataset)

    def ids(self, block: int) -> np.ndarray:
        return np.arange(block * self.block, min((block + 1) * self.block, self.count))

    def params(self, view: int, block: int) -> Table:
        ids = self.ids(block)
        return self.plan.draw(view, ids, self.sizes[ids])


# -- ordering --------------------------------------------------------------------------------


def epoch_units(epoch: int, num_views: int, num_blocks: int, seed: int) -> list[tuple[int, int]]:
    """The (view, block) units of one epoch: every block once, in a shuffled order.

    Each block walks through a fresh permutation of all views before it repeats
    any, so ``num_views`` epochs use every stored view exactly once.
    """
    cycle, step = divmod(epoch, num_views)
    units = []
    for b in np.random.default_rng([seed, epoch, 0]).permutation(num_blocks):
        views = np.random.default_rng([seed, int(b), cycle, 1]).permutation(num_views)
        units.append((int(views[step]), int(b)))
    return units


def concat(tables: list[Table]) -> Table:
    return {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}


def take(table: Table, index) -> Table:
    return {k: v[index] for k, v in table.items()}


def shuffle_windows(tables: Iterable[Table], window: int, rng: np.random.Generator) -> Iterator[Table]:
    """Concatenate ``window`` tables at a time and shuffle their rows in memory."""
    buffer = []
    for table in tables:
        buffer.append(table)
        if len(buffer) == window:
            merged = concat(buffer)
            yield take(merged, rng.permutation(len(merged["id"])))
            buffer = []
    if buffer:
        merged = concat(buffer)
        yield take(merged, rng.permutation(len(merged["id"])))


def rebatch(tables: Iterable[Table], batch_size: int, drop_last: bool) -> Iterator[Table]:
    """Re-cut a stream of tables into tables of exactly ``batch_size`` rows."""
    rest = None
    for table in tables:
        table = concat([rest, table]) if rest is not None else table
        n = len(table["id"])
        full = n - n % batch_size
        for start in range(0, full, batch_size):
            yield take(table, slice(start, start + batch_size))
        rest = take(table, slice(full, n)) if full < n else None
    if rest is not None and not drop_last:
        yield rest


def even_batches(table: Table, batch_size: int) -> Iterator[Table]:
    """Split one table into near-equal batches of at most ``batch_size`` rows.

    CPU convolutions give per-sample results that depend on the batch when it
    is very small (measured: rows differ by ~5e-8 in batches under 16); equal
    splitting never leaves a tiny trailing batch.
    """
    n = len(table["id"])
    for part in np.array_split(np.arange(n), max(1, -(-n // batch_size))):
        yield take(table, part)


# -- rendering -------------------------------------------------------------------------------


class ViewRenderer(Dataset):
    """Renders one view per item; runs in loader workers.

    An item is ``(sample id, params, check)``: it carries its parameters, so a
    worker needs nothing but the dataset. ``sizes`` are the output sizes wanted
    (one per model); with ``check`` the item also gets the fingerprint of its
    render at ``plan_size``.
    """

    def __init__(self, dataset: ImageDataset, plan: ViewPlan, sizes: tuple[int, ...], plan_size: int | None = None):
        self.dataset, self.plan, self.sizes, self.plan_size = dataset, plan, tuple(sizes), plan_size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        i, params, check = item
        image = self.dataset.image(int(i))
        views = {s: self.plan.render(image, params, s) for s in dict.fromkeys(self.sizes)}
        fp = -1
        if check:
            view = views.get(self.plan_size)
            fp = fingerprint(view if view is not None else self.plan.render(image, params, self.plan_size))
        return {"views": [views[s] for s in self.sizes], "fingerprint": fp}


def items(batch: Table, param_names: Iterable[str], check: np.ndarray | None = None) -> list[tuple]:
    params = {k: batch[k] for k in param_names}
    checks = check if check is not None else np.zeros(len(batch["id"]), bool)
    return [(int(i), row(params, j), bool(checks[j])) for j, i in enumerate(batch["id"])]


def render_batches(
    renderer: ViewRenderer, batches: Iterable[Table], param_names, workers: int = 0, check_column: str | None = None
) -> Iterator[tuple[Table, dict]]:
    """Yield ``(batch, rendered)`` in the order of ``batches``, rendering in ``workers`` processes."""
    pending: deque[Table] = deque()

    def index_batches():
        for batch in batches:
            pending.append(batch)
            yield items(batch, param_names, batch.get(check_column) if check_column else None)

    loader = DataLoader(
        renderer,
        batch_sampler=index_batches(),
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    try:
        for rendered in loader:
            yield pending.popleft(), rendered
    except UserError as e:
        # A worker's error arrives wrapped in its traceback text; keep the user's one line.
        raise UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None


def labelled_mask(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Which samples keep their label: a stratified ``fraction`` of each class, fixed by ``seed``."""
    if fraction >= 1.0:
        return np.ones(len(labels), bool)
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        keep = int(round(fraction * len(members)))
        mask[np.random.default_rng([seed, int(c)]).permutation(members)[:keep]] = True
    return mask
