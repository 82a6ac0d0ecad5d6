"""Replaying recorded views: where they come from, in what order, and rendering them in parallel.

Data moves as *tables*: dicts of equal-length numpy columns (``id``, ``view``,
``label``, the view parameters, a mixing partner's parameters ``p:<name>``,
cached teacher rows ``t:<name>``...). A unit table holds one (view, block)
unit; the stages below turn a stream of unit tables into shuffled fixed-size
batch tables, and ``render_batches`` renders each batch's images in loader
workers while keeping the batch order, so the result never depends on the
number of workers.

Mixing partners are mates (a random perfect matching of the unit, see
``stages.data.views.pair_partners``). A unit table names each row's mixing group
(``PAIR``); shuffling moves whole groups and re-batching cuts between them,
so both mates land in one batch, where the renderer decodes and renders each
image once and mixes the pair from the two renders.

The package, one module per step of the chain as ``timm/data/`` keeps its loader apart from its transforms:
``order`` (a block's samples, an epoch's units, the labelled share), ``sources`` (``StoredViews``,
``DrawnViews``), ``tables`` (a table, a unit's table with its partners and images), ``batching`` (shuffle
windows, re-batching between mixing groups) and ``render`` (``ViewRenderer``, ``render_batches``, fingerprint
checks).
"""

from .batching import JOINED_ROWS, even_batches, group_bounds, join_by_sample, pack_groups, rebatch, shuffle_windows
from .order import ORDER_STREAM, block_slice, epoch_units, labelled_mask, sample_order, window_units
from .render import Item, ViewRenderer, check_fingerprints, fingerprint_mismatch, items, render_batches
from .sources import DrawnViews, StoredViews
from .tables import IMAGES, PAIR, PARTNER, Table, concat, mix_groups, take, unit_table, with_images, with_partner_params

__all__ = [
    "IMAGES",
    "JOINED_ROWS",
    "ORDER_STREAM",
    "PAIR",
    "PARTNER",
    "DrawnViews",
    "Item",
    "StoredViews",
    "Table",
    "ViewRenderer",
    "block_slice",
    "check_fingerprints",
    "concat",
    "epoch_units",
    "even_batches",
    "fingerprint_mismatch",
    "group_bounds",
    "items",
    "join_by_sample",
    "labelled_mask",
    "mix_groups",
    "pack_groups",
    "rebatch",
    "render_batches",
    "sample_order",
    "shuffle_windows",
    "take",
    "unit_table",
    "window_units",
    "with_images",
    "with_partner_params",
]
