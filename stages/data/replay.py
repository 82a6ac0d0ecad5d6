"""Replaying recorded views: where they come from, in what order, and rendering them in parallel.

Data moves as *tables*: dicts of equal-length numpy columns (``id``, ``view``,
``label``, the view parameters, a mixing partner's parameters ``p:<name>``,
cached teacher rows ``t:<name>``...). A unit table holds one (view, block)
unit; the stages below turn a stream of unit tables into shuffled fixed-size
batch tables, and ``render_batches`` renders each batch's images in loader
workers while keeping the batch order, so the result never depends on the
number of workers.

Mixing partners are mates (a random perfect matching of the unit, see
``stages.views.pair_partners``). A unit table names each row's mixing group
(``PAIR``); shuffling moves whole groups and re-batching cuts between them,
so both mates land in one batch, where the renderer decodes and renders each
image once and mixes the pair from the two renders.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from storage import Store, UserError
from storage.errors import remote_user_error

from .image_dataset import ImageDataset
from .views import ViewPlan, fingerprint, row, uniforms

Table = dict[str, np.ndarray]

PARTNER = "p:"  # prefix of the partner's parameter columns in a table
PAIR = "pair"  # a row's mixing group: it and its mate share their renders, so they travel together
IMAGES = "encoded"  # the rows' encoded images, read ahead in shard order (``ImageDataset.encoded``)


# -- which samples a block holds -------------------------------------------------------------

ORDER_STREAM = 1000  # the uniforms' stream of the sample order (the view ops use 0..5)


def sample_order(num_samples: int, seed: int, permute: bool = True) -> np.ndarray:
    """(N,) int64: the sample id at each position; block b is positions [b * B, (b + 1) * B).

    A seeded uniform permutation, so that every block is a random sample of the
    dataset: real datasets list their images class by class (a folder per
    class, ImageNet's layout), and blocks of consecutive ids would hold one or
    two classes each, making batches and mixing partners far from independent.
    It sorts a counter-based hash of (seed, id), so it is the same with any
    numpy. ``permute=False`` keeps the id order, for sources that must be read
    front to back (``ImageDataset.sequential``: tar shards, shuffled when written).
    """
    ids = np.arange(num_samples, dtype=np.int64)
    if not permute:
        return ids
    return np.argsort(uniforms(seed, 0, ids, ORDER_STREAM, 1)[:, 0], kind="stable").astype(np.int64)


def block_slice(order: np.ndarray, block: int, size: int) -> np.ndarray:
    """The sample ids of ``block`` (blocks of ``size`` positions) in ``order``."""
    return order[block * size : (block + 1) * size]


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
        """The sample ids of ``block``, in the store's order (its rows)."""
        return self.store.block_ids(block)

    def params(self, view: int, block: int) -> Table:
        return self.group.read_unit(view, block, self.names, rows=len(self.ids(block)), verify=True)


class DrawnViews:
    """View parameters drawn on the fly from a plan (training without a store).

    Blocks are slices of ``order`` as a store's are (default: ``sample_order``
    seeded by the plan, the id order for a ``sequential`` source).
    """

    def __init__(
        self, plan: ViewPlan, dataset: ImageDataset, num_views: int, block: int = 1024, order: np.ndarray | None = None
    ):
        self.plan, self.num_views, self.block = plan, num_views, block
        self.sizes = dataset.sizes()
        self.num_blocks = -(-len(dataset) // block)
        self.count = len(dataset)
        self.order = (
            sample_order(len(dataset), plan.seed, not dataset.sequential)
            if order is None
            else np.asarray(order, np.int64)
        )

    def ids(self, block: int) -> np.ndarray:
        return block_slice(self.order, block, self.block)

    def params(self, view: int, block: int) -> Table:
        ids = self.ids(block)
        return self.plan.draw(view, ids, self.sizes[ids])


# -- ordering --------------------------------------------------------------------------------


def epoch_units(
    epoch: int, num_views: int, num_blocks: int, seed: int, repeats: int = 1, view_groups: int = 1
) -> list[tuple[int, int]]:
    """The (view, block) units of one epoch: every block once, in a shuffled order.

    Each block walks through a fresh permutation of all views before it repeats
    any, so ``num_views`` epochs use every stored view exactly once.

    ``repeats`` R > 1 is repeated augmentation (timm's ``--aug-repeats``, its
    RepeatAugSampler): an epoch takes a share 1 / R of the blocks, each with R
    different views, the R units of a block next to each other so that one
    shuffle window holds them all. An epoch keeps about N samples' worth of
    rows, and every R epochs take every block once. R = 1 is the plain order.

    ``view_groups`` K > 1 (the recipe's ``mix_pair_views``: views 0..K-1, K..2K-1, ... share their
    mixing partners) walks the views group by group, in a shuffled order of groups, so that with
    R = K a block's R views of an epoch are one group: its samples and their partners form groups
    of 2R rows that render from one decode per image (``shuffle_windows``).
    """
    if not 1 <= repeats <= num_views:
        raise ValueError(f"repeats must lie in [1, {num_views}] (the views), not {repeats}")
    rnd, part = divmod(epoch, repeats)
    order = np.random.default_rng([seed, epoch, 0] if repeats == 1 else [seed, rnd, 0, repeats]).permutation(num_blocks)
    # A block is used once per round of R epochs, taking R views of its current pass over the views.
    cycle, use = divmod(rnd, num_views // repeats)
    units = []
    for b in np.array_split(order, repeats)[part]:
        rng = np.random.default_rng([seed, int(b), cycle, 1])
        if view_groups == 1:
            views = rng.permutation(num_views)
        else:
            groups = [np.arange(g, min(g + view_groups, num_views)) for g in range(0, num_views, view_groups)]
            views = np.concatenate([rng.permutation(groups[k]) for k in rng.permutation(len(groups))])
        units += [(int(v), int(b)) for v in views[use * repeats : (use + 1) * repeats]]
    return units


def window_units(window_rows: int, block: int, repeats: int = 1) -> int:
    """Units shuffled together in memory: about ``window_rows`` rows, whole blocks, a multiple of ``repeats``
    (so a block's repeated views share a window)."""
    return repeats * max(1, window_rows // block // repeats)


def concat(tables: list[Table]) -> Table:
    return {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}


def take(table: Table, index) -> Table:
    return {k: v[index] for k, v in table.items()}


def shuffle_windows(
    tables: Iterable[Table], window: int, rng: np.random.Generator, by_sample: bool = False
) -> Iterator[Table]:
    """Concatenate ``window`` tables at a time and shuffle them in memory.

    Rows are shuffled one by one, or, in tables with mixing groups (``PAIR``),
    group by group: mates come out next to each other, in a shuffled order of groups.
    ``by_sample`` (repeated views): a sample's rows are one group, so its R views land in
    one batch and the renderer decodes its image once for all of them, as timm's
    RepeatAugSampler puts a sample's R copies side by side in one process's batch. With
    mixing, the mixing groups that share a sample are joined where the union stays small
    (``join_by_sample``): a plan whose R views share their partners (``mix_pair_views``)
    gives groups of a sample's and its partner's R views; partners drawn per view link a
    window into one large component, and then each view's mates stay a group of their own.
    """
    buffer = []
    for table in tables:
        buffer.append(table)
        if len(buffer) == window:
            yield _shuffled(buffer, rng, by_sample)
            buffer = []
    if buffer:
        yield _shuffled(buffer, rng, by_sample)


def _shuffled(tables: list[Table], rng: np.random.Generator, by_sample: bool = False) -> Table:
    merged = concat(tables)
    if PAIR in merged:
        # A table's group keys lie in [0, its rows): offset by the table's first row, they are unique in the window.
        lengths = [len(t["id"]) for t in tables]
        keys = merged[PAIR] + np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
        if by_sample:
            keys = join_by_sample(keys, merged["id"])
    elif by_sample:
        keys = merged["id"]
    else:
        return take(merged, rng.permutation(len(merged["id"])))
    _, group = np.unique(keys, return_inverse=True)
    place = np.empty(group.max() + 1, np.int64)
    place[rng.permutation(len(place))] = np.arange(len(place))
    rank = place[group.ravel()]  # each row's group's place in the shuffled order
    order = np.argsort(rank, kind="stable")
    return {**take(merged, order), PAIR: rank[order]}


JOINED_ROWS = (
    16  # the most rows of a joined group: R views of a sample and its partner (2R; 3R with a block's odd one out)
)


def join_by_sample(keys: np.ndarray, ids: np.ndarray, limit: int = JOINED_ROWS) -> np.ndarray:
    """Group keys where groups (``keys``) that hold rows of one sample are joined, when the joined group has at most
    ``limit`` rows; rows of larger unions keep their own group (a new key each, the same split as ``keys``)."""
    from scipy.sparse import coo_matrix  # scipy comes with scikit-learn
    from scipy.sparse.csgraph import connected_components

    _, group = np.unique(keys, return_inverse=True)
    _, sample = np.unique(ids, return_inverse=True)
    groups, samples = group.max() + 1, sample.max() + 1
    # Groups and samples are the nodes of one graph; each row links its group to its sample.
    links = coo_matrix((np.ones(len(group), np.int8), (group, groups + sample)), shape=(groups + samples,) * 2)
    _, component = connected_components(links, directed=False)
    joined = component[group]
    small = np.bincount(joined)[joined] <= limit
    return np.where(small, joined, component.max() + 1 + group)


def group_bounds(pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first row, rows) of each run of equal ``PAIR`` values: the mixing groups of a table whose groups are contiguous."""
    pair = np.asarray(pair)
    starts = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]]) if len(pair) else np.zeros(0, np.int64)
    return starts, np.diff(np.r_[starts, len(pair)])


def pack_groups(pair: np.ndarray, batch_size: int, wait: int = 4) -> tuple[np.ndarray, int]:
    """A row order that cuts into batches of ``batch_size`` between mixing groups, and how many rows fill whole batches.

    Groups (runs of equal ``pair``) keep their order, except that a group that
    would straddle a cut waits, while later groups that fit fill the batch, and
    opens the next batch. At most ``wait`` groups wait; past that (only pairs
    left and an odd room, say), a group is cut. The rows after the whole batches
    (a partial batch and the waiting groups) are to be packed again with more rows.
    """
    starts, sizes = group_bounds(pair)
    placed, waiting, filled = [], deque(), 0

    def room() -> int:
        return batch_size - filled % batch_size

    for g, size in enumerate(sizes):
        if room() < size <= batch_size and len(waiting) < wait:
            waiting.append(g)
            continue
        placed.append(g)
        filled += int(size)
        while waiting and sizes[waiting[0]] <= room():
            placed.append(waiting.popleft())
            filled += int(sizes[placed[-1]])
    seq = np.asarray(placed + list(waiting), np.int64)
    lens = sizes[seq]
    rows = np.repeat(starts[seq] - (np.cumsum(lens) - lens), lens) + np.arange(int(lens.sum()))
    return rows, filled - filled % batch_size


def rebatch(tables: Iterable[Table], batch_size: int, drop_last: bool) -> Iterator[Table]:
    """Re-cut a stream of tables into tables of exactly ``batch_size`` rows.

    Tables with mixing groups (``PAIR``, each group's rows contiguous, as
    ``shuffle_windows`` leaves them) are cut between groups wherever the group
    sizes allow (``pack_groups``), so that mates render in the same batch.
    """
    rest = None
    for table in tables:
        table = concat([rest, table]) if rest is not None else table
        n = len(table["id"])
        full = n - n % batch_size
        if PAIR in table:
            order, full = pack_groups(table[PAIR], batch_size)
            table = take(table, order)
        for start in range(0, full, batch_size):
            yield take(table, slice(start, start + batch_size))
        rest = take(table, slice(full, n)) if full < n else None
        if rest is not None and PAIR in rest:
            # Negative keys: never equal to the next table's (>= 0), so its first group stays its own.
            starts, sizes = group_bounds(rest[PAIR])
            rest[PAIR] = np.repeat(-1 - np.arange(len(starts)), sizes)
    if rest is not None:
        n = len(rest["id"])
        # The last rows: whole batches as they come (a waiting group may be cut now), then what is left.
        for start in range(0, n - n % batch_size if drop_last else n, batch_size):
            yield take(rest, slice(start, start + batch_size))


def even_batches(table: Table, batch_size: int) -> Iterator[Table]:
    """Split one table into near-equal batches of at most ``batch_size`` rows.

    CPU convolutions give per-sample results that depend on the batch when it
    is very small (measured: rows differ by ~5e-8 in batches under 16); equal
    splitting never leaves a tiny trailing batch. A table with mixing groups
    (``PAIR``, a whole unit's) comes out group by group, and a cut moves by up
    to two rows (a batch may exceed ``batch_size`` by as much) to fall between groups.
    """
    n = len(table["id"])
    parts = max(1, -(-n // batch_size))
    if PAIR not in table:
        for part in np.array_split(np.arange(n), parts):
            yield take(table, part)
        return
    table = take(table, np.argsort(table[PAIR], kind="stable"))
    starts, _ = group_bounds(table[PAIR])
    ideal = np.cumsum([len(p) for p in np.array_split(np.arange(n), parts)])[:-1]
    near = starts[np.clip(np.searchsorted(starts, ideal), 0, len(starts) - 1)] if len(starts) else ideal
    before = (
        starts[np.clip(np.searchsorted(starts, ideal, side="right") - 1, 0, len(starts) - 1)] if len(starts) else ideal
    )
    best = np.where(np.abs(before - ideal) <= np.abs(near - ideal), before, near)
    cuts = np.maximum.accumulate(np.where(np.abs(best - ideal) <= 2, best, ideal))
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, n]):
        if hi > lo:
            yield take(table, slice(int(lo), int(hi)))


# -- rendering -------------------------------------------------------------------------------


class Item(NamedTuple):
    """One row of a batch as a loader worker gets it: everything its view needs but the dataset."""

    id: int
    params: dict
    check: bool = False  # fingerprint the view at the plan's size
    partner: dict | None = None  # the partner's own parameters, for a view that mixes
    mate: int = -1  # the partner's row in the same batch, whose render the mix reuses; -1: rendered again here
    data: bytes | None = None  # the encoded image, when the batch carries it (``IMAGES``)


class ViewRenderer(Dataset):
    """Renders one batch of views per index; runs in loader workers.

    An index is a list of ``Item`` (``items``). Each image is decoded once per
    batch and each row's own view (every op but the mixing) rendered once per
    size; a view that mixes is its own render mixed with its mate's, so a pair
    of mates costs two decodes and two renders for two mixed views. A partner
    outside the batch is rendered again from its parameters. ``sizes`` are the
    output sizes wanted (one per model); a row with ``check`` also gets the
    fingerprint of its view at ``plan_size``. ``lam`` (float64, (B, sizes)) is
    the share of each sample's own image in its views (1 without mixing): the
    weight of its label in a mixed target.
    """

    def __init__(self, dataset: ImageDataset, plan: ViewPlan, sizes: tuple[int, ...], plan_size: int | None = None):
        self.dataset, self.plan, self.sizes, self.plan_size = dataset, plan, tuple(sizes), plan_size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, batch: list[Item]) -> dict:
        return self.render_batch(batch)

    def render_batch(self, batch: list[Item]) -> dict:
        """``views`` [(B, 3, S, S) uint8 per size], ``fingerprint`` (B,) int64 (-1 unchecked), ``lam`` (B, sizes) float64."""
        images: dict[int, torch.Tensor] = {}
        own: dict[tuple[int, int], torch.Tensor] = {}
        mixed: dict[tuple[int, int], torch.Tensor] = {}

        def image(i: int, data: bytes | None) -> torch.Tensor:
            if i not in images:
                images[i] = self.dataset.image(i) if data is None else self.dataset.decode(i, data)
            return images[i]

        def own_view(j: int, size: int) -> torch.Tensor:
            if (j, size) not in own:
                item = batch[j]
                own[j, size] = self.plan.render_own(image(item.id, item.data), item.params, size)
            return own[j, size]

        def view(j: int, size: int) -> torch.Tensor:
            if (j, size) not in mixed:
                item, out = batch[j], own_view(j, size)
                partner = int(item.params.get("mix_partner", -1)) if self.plan.mixer is not None else -1
                if partner >= 0:
                    if item.partner is None:
                        raise ValueError(
                            f"sample {item.id} mixes with sample {partner}: its item needs the partner's parameters"
                        )
                    mate = (
                        own_view(item.mate, size)
                        if item.mate >= 0
                        else self.plan.render_own(image(partner, None), item.partner, size)
                    )
                    out = self.plan.mixer.mix(out, mate, item.params)
                mixed[j, size] = out
            return mixed[j, size]

        rows = range(len(batch))
        stacked = {
            s: torch.stack([view(j, s) for j in rows]) if batch else torch.zeros(0, 3, s, s, dtype=torch.uint8)
            for s in dict.fromkeys(self.sizes)
        }
        prints = [fingerprint(view(j, self.plan_size)) if batch[j].check else -1 for j in rows]
        lam = [[self.plan.lam(batch[j].params, s) for s in self.sizes] for j in rows]
        return {
            "views": [stacked[s] for s in self.sizes],
            "fingerprint": torch.tensor(prints, dtype=torch.int64),
            "lam": torch.tensor(lam, dtype=torch.float64).reshape(len(batch), len(self.sizes)),
        }


def with_partner_params(table: Table, param_names: Iterable[str]) -> Table:
    """``table`` plus, for each row, its mixing partner's parameters as columns ``p:<name>`` and its mixing group ``PAIR``.

    The partner of a row is drawn from the same (view, block) unit, so it is
    looked up by id inside this unit table; call it on a whole unit table,
    before shuffling or re-batching. A table without ``mix_partner`` (a plan
    that does not mix) comes back unchanged. Rows that do not mix carry their
    own parameters there, which nothing reads. ``PAIR`` (``mix_groups``) is
    what ``shuffle_windows``, ``rebatch`` and ``even_batches`` keep together.
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
    return {**table, PAIR: mix_groups(rows, mixes), **{PARTNER + k: np.asarray(table[k])[rows] for k in param_names}}


def mix_groups(mate_rows: np.ndarray, mixes: np.ndarray) -> np.ndarray:
    """Each row's mixing group in a unit table, named by its smallest row index.

    A row that mixes joins the row it mixes with when that one mixes back with
    it (mates of the plan's matching) or does not mix at all; other rows (the
    odd one out of a block, partners drawn one-way by older plans) stay alone,
    and their partner is rendered again where it is not in the same batch.
    """
    group = np.arange(len(mate_rows))
    j = np.flatnonzero(mixes)
    k = mate_rows[j]
    back = np.where(mixes[k], mate_rows[k], -1)
    ok = (back == j) | (back == -1)
    j, k = j[ok], k[ok]
    np.minimum.at(group, j, np.minimum(j, k))
    np.minimum.at(group, k, np.minimum(j, k))
    return group


def with_images(table: Table, dataset: ImageDataset) -> Table:
    """``table`` plus its rows' encoded images (``IMAGES``) where the dataset reads them in one pass over its shards.

    Call it on a whole unit table (its block's samples are neighbours in the
    shards); other datasets, and a table that has them already, come back unchanged.
    """
    if IMAGES in table:
        return table
    data = dataset.encoded(np.asarray(table["id"]))
    return table if data is None else {**table, IMAGES: data}


def unit_table(
    views, v: int, b: int, labels: np.ndarray | None, param_names: Iterable[str], *, params: Table | None = None
) -> Table:
    """One (view, block) unit as a table: its view parameters (and, from a store, fingerprints), ``id``,
    ``view``, ``label`` (unless ``labels`` is None) and each row's mixing partner's parameters ``p:<name>``.

    ``views``: a ``StoredViews`` or ``DrawnViews``; ``params``: the unit's parameters when they do not come
    from ``views`` (extraction draws those of units its plan lacks). Built whole, so every partner is in it.
    """
    ids = views.ids(b)
    table = {**(views.params(v, b) if params is None else params), "id": ids, "view": np.full(len(ids), v)}
    if labels is not None:
        table["label"] = labels[ids]
    return with_partner_params(table, param_names)


def fingerprint_mismatch(table: Table, fingerprints: np.ndarray, checked: np.ndarray | None = None) -> str | None:
    """What is wrong when views rendered now do not match the fingerprints the plan recorded, or None.

    ``table``: rows with ``id``, ``view`` and the recorded ``fingerprint``; ``fingerprints``: those of the
    views as rendered now (one per row); ``checked``: the rows that were fingerprinted (default: all).
    """
    checked = np.ones(len(fingerprints), bool) if checked is None else np.asarray(checked, bool)
    bad = np.flatnonzero(
        checked & (np.asarray(fingerprints).astype(np.int64) != np.asarray(table["fingerprint"]).astype(np.int64))
    )
    if not len(bad):
        return None
    j = bad[0]
    return (
        f"view {int(table['view'][j])} of sample {int(table['id'][j])} replays differently from the view recorded in the store's plan "
        f"({len(bad)} of {int(checked.sum())} checked views differ): the images or an imaging library changed since extraction"
    )


def check_fingerprints(table: Table, fingerprints: np.ndarray, store: Store, checked: np.ndarray | None = None) -> None:
    """Raise ``UserError`` when views rendered now differ from the ones the store's plan recorded (``fingerprint_mismatch``)."""
    problem = fingerprint_mismatch(table, fingerprints, checked)
    if problem:
        raise UserError(
            f"{problem}; compare the versions in {store.path}/store.json with this environment, or extract again"
        )


def items(batch: Table, param_names: Iterable[str], check: np.ndarray | None = None) -> list[Item]:
    """The ``Item`` of each row of ``batch``: a mixing row's mate is the row of its partner's id (and view) in the batch."""
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
    ids = np.asarray(batch["id"])
    checks = check if check is not None else np.zeros(len(ids), bool)
    mates = np.full(len(ids), -1, np.int64)
    if mixes.any():
        views = np.asarray(batch["view"]) if "view" in batch else np.zeros(len(ids), np.int64)
        where = {}
        for j, key in enumerate(zip(ids.tolist(), views.tolist())):
            where.setdefault(key, j)
        for j in np.flatnonzero(mixes):
            mates[j] = where.get((int(batch["mix_partner"][j]), int(views[j])), -1)
    data = batch.get(IMAGES)
    return [
        Item(
            int(i),
            row(params, j),
            bool(checks[j]),
            row(partners, j) if mixes[j] else None,
            int(mates[j]),
            None if data is None else data[j],
        )
        for j, i in enumerate(ids)
    ]


def render_batches(
    renderer: ViewRenderer, batches: Iterable[Table], param_names, workers: int = 0, check_column: str | None = None
) -> Iterator[tuple[Table, dict]]:
    """Yield ``(batch, rendered)`` in the order of ``batches``, rendering in ``workers`` processes.

    A batch without encoded images reads them here where the dataset reads in
    shard order (``with_images``): whole units should carry them already, read in one pass.
    """
    pending: deque[Table] = deque()

    def index_batches():
        for batch in batches:
            pending.append(batch)
            yield items(
                with_images(batch, renderer.dataset), param_names, batch.get(check_column) if check_column else None
            )

    loader = DataLoader(
        renderer,
        sampler=index_batches(),
        batch_size=None,  # each index is a whole batch: the renderer shares renders between mates
        num_workers=workers,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    try:
        for rendered in loader:
            yield pending.popleft(), rendered
    except UserError as e:
        # A worker's error arrives wrapped in its traceback text; keep the user's one line.
        raise (remote_user_error(str(e)) or e) from None


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
