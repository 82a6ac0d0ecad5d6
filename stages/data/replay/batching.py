"""From a stream of unit tables to batch tables: shuffled within a window in memory, re-cut into fixed-size batches.

Rows move in mixing groups (``PAIR``): shuffling moves whole groups and re-batching cuts between them, so both
mates of a pair (and, with repeated views, a sample's views) land in one batch, where the renderer decodes and
renders each image once.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import numpy as np

from .tables import PAIR, Table, concat, take


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
