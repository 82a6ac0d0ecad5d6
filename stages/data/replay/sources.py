"""Where view parameters come from: a store's recorded plan (``StoredViews``), or drawn on the fly (``DrawnViews``).

Both answer the same two questions, a block's sample ids and a unit's parameters, so the loader and the
renderer never ask which one they replay.
"""

from __future__ import annotations

import numpy as np

from storage import Store

from ..image_dataset import ImageDataset
from ..views import ViewPlan
from .order import block_slice, sample_order
from .tables import Table


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
