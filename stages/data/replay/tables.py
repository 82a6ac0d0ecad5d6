"""Tables, the form data moves in, and the table of one (view, block) unit with its mixing partners.

A table is a dict of equal-length numpy columns (``id``, ``view``, ``label``, the view parameters, a mixing
partner's parameters ``p:<name>``, cached teacher rows ``t:<name>``...). A unit's table is built whole, so that
every row's mixing partner is in it; the constants name the columns the later stages add and keep together.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..image_dataset import ImageDataset


Table = dict[str, np.ndarray]
PARTNER = "p:"  # prefix of the partner's parameter columns in a table
PAIR = "pair"  # a row's mixing group: it and its mate share their renders, so they travel together
IMAGES = "encoded"  # the rows' encoded images, read ahead in shard order (``ImageDataset.encoded``)


def concat(tables: list[Table]) -> Table:
    return {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}


def take(table: Table, index) -> Table:
    return {k: v[index] for k, v in table.items()}


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
