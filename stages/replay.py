"""Replaying recorded views: where they come from, in what order, and rendering them in parallel.

Data moves as *tables*: dicts of equal-length numpy columns (``id``, ``view``,
``label``, the view parameters, a mixing partner's parameters ``p:<name>``,
cached teacher rows ``t:<name>``...). A unit table holds one (view, block)
unit; the stages below turn a stream of unit tables into shuffled fixed-size
batch tables, and ``render_batches`` renders each batch's images in loader
workers while keeping the batch order, so the result never depends on the
number of workers.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import numpy as np
import torch
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
        return self.group.read_unit(view, block, self.names, rows=len(self.ids(block)), verify=True)


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

    An item is ``(sample id, params, check)`` or ``(sample id, params, check,
    partner params)``: it carries its parameters (and, for a view that mixes,
    its partner's), so a worker needs nothing but the dataset. ``sizes`` are
    the output sizes wanted (one per model); with ``check`` the item also gets
    the fingerprint of its render at ``plan_size``. ``lam`` (float64, one per
    size) is the share of the sample's own image in each view (1 without mixing):
    the weight of its label in a mixed target.
    """

    def __init__(self, dataset: ImageDataset, plan: ViewPlan, sizes: tuple[int, ...], plan_size: int | None = None):
        self.dataset, self.plan, self.sizes, self.plan_size = dataset, plan, tuple(sizes), plan_size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        i, params, check, partner_params = item if len(item) == 4 else (*item, None)
        image = self.dataset.image(int(i))
        partner = None
        if partner_params is not None:
            partner = (self.dataset.image(int(params["mix_partner"])), partner_params)
        views = {s: self.plan.render(image, params, s, partner) for s in dict.fromkeys(self.sizes)}
        fp = -1
        if check:
            view = views.get(self.plan_size)
            fp = fingerprint(view if view is not None else self.plan.render(image, params, self.plan_size, partner))
        lam = torch.tensor([self.plan.lam(params, s) for s in self.sizes], dtype=torch.float64)
        return {"views": [views[s] for s in self.sizes], "fingerprint": fp, "lam": lam}


PARTNER = "p:"  # prefix of the partner's parameter columns in a table


def with_partner_params(table: Table, param_names: Iterable[str]) -> Table:
    """``table`` plus, for each row, its mixing partner's parameters as columns ``p:<name>``.

    The partner of a row is drawn from the same (view, block) unit, so it is
    looked up by id inside this unit table; call it on a whole unit table,
    before shuffling or re-batching. A table without ``mix_partner`` (a plan
    that does not mix) comes back unchanged. Rows that do not mix carry their
    own parameters there, which nothing reads.
    """
    if "mix_partner" not in table:
        return table
    ids, partner = np.asarray(table["id"]), np.asarray(table["mix_partner"], dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids[order], partner), len(ids) - 1)
    found = ids[order][pos] == partner
    mixes = partner >= 0
    if (mixes & ~found).any():
        j = int(np.flatnonzero(mixes & ~found)[0])
        raise ValueError(
            f"sample {int(ids[j])} mixes with sample {int(partner[j])}, which is not in its unit table: "
            "add partner parameters to whole unit tables, before shuffling"
        )
    rows = np.where(mixes, order[pos], np.arange(len(ids)))
    return {**table, **{PARTNER + k: np.asarray(table[k])[rows] for k in param_names}}


def items(batch: Table, param_names: Iterable[str], check: np.ndarray | None = None) -> list[tuple]:
    # Evaluation tables carry only crop and flip: the other ops leave such views alone.
    names = [k for k in param_names if k in batch]
    params = {k: batch[k] for k in names}
    partner_names = [k for k in names if PARTNER + k in batch]
    partners = {k: batch[PARTNER + k] for k in partner_names}
    mixes = np.asarray(batch["mix_partner"]) >= 0 if "mix_partner" in batch else np.zeros(len(batch["id"]), bool)
    if mixes.any() and not partners:
        raise ValueError(
            "views in this batch mix with a partner but the batch has no partner parameters: "
            "build unit tables through stages.replay.with_partner_params before shuffling"
        )
    checks = check if check is not None else np.zeros(len(batch["id"]), bool)
    return [
        (int(i), row(params, j), bool(checks[j]), row(partners, j) if mixes[j] else None)
        for j, i in enumerate(batch["id"])
    ]


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
