"""Setting a store up for a stage: create or reopen it, and check it against the data and view plan in hand.

A store records the dataset's fingerprint and the view plan it was made with
(store.json); every stage that reopens it checks those before reading a
unit, so a store is never silently used with other images or other views.
"""

from __future__ import annotations

import platform

import numpy as np

from storage import ArraySpec, DatasetRecord, PlanRecord, Store, UserError
from storage.store import STORE_FILE

from ..data.datasets import ImageDataset, open_dataset
from ..data.decode import ORIENTATION
from ..data.replay import sample_order
from ..data.views import ViewPlan, ViewRecipe

FINGERPRINT = ArraySpec((), "uint32")  # the plan's per-view render fingerprint, [V, N]


def library_versions() -> dict:
    """The libraries a rendered view or a teacher output depends on (store.json, teacher.json)."""
    import PIL
    import timm
    import torch
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
        "orientation": ORIENTATION,  # how JPEG EXIF orientation is treated (ignored, as timm's loader)
    }


def open_store(path, dataset: ImageDataset, plan: ViewPlan, *, views: int, block: int, size: int) -> Store:
    """Create the store for (dataset, plan), or reopen it after checking it was made from them.

    A new store's blocks are slices of a permutation of the sample ids seeded by the plan (``sample_order``),
    so each is a random sample of the dataset; a ``sequential`` source keeps its own order (its shards).
    Appending views and adding teachers keep the order the store was made with.
    """
    if not Store.exists(path):
        return create_store(path, dataset, plan, views=views, block=block, size=size)
    store = Store(path)
    check_dataset(store, dataset)
    check_plan(store, plan)
    return store


def create_store(path, dataset: ImageDataset, plan: ViewPlan, *, views: int, block: int, size: int) -> Store:
    """A new store for (dataset, plan), its views rendered at ``size``: see ``open_store``."""
    permute = not dataset.sequential
    specs = {**plan.fields, "fingerprint": FINGERPRINT}
    order = sample_order(len(dataset), plan.seed, permute)
    return Store.create(
        path,
        dataset=DatasetRecord(**dataset.describe()),
        plan=PlanRecord(**plan.describe(), size=size),
        versions=library_versions(),
        num_views=views,
        block=block,
        plan_specs=specs,
        order=order,
        order_seed=plan.seed if permute else None,
    )


def check_dataset(store: Store, dataset: ImageDataset) -> None:
    made = store.record.dataset
    if made.fingerprint != dataset.fingerprint():
        raise UserError(
            f"store {store.path} was made from dataset {made.source} ({made.num_samples} samples, "
            f"fingerprint {made.fingerprint[:12]}), not {dataset.source} ({len(dataset)} samples, "
            f"fingerprint {dataset.fingerprint()[:12]}): use the same --data, or a new --store"
        )


def check_plan(store: Store, plan: ViewPlan) -> None:
    made = store.record.plan
    if made.recipe != plan.recipe.to_dict() or made.seed != plan.seed:
        raise UserError(
            f"store {store.path} was made with view plan seed {made.seed} recipe {made.recipe}, "
            f"not seed {plan.seed} recipe {plan.recipe.to_dict()}: use the same view settings, or a new --store"
        )


def stored_plan(store: Store) -> ViewPlan:
    """The view plan a store was made with."""
    made = store.record.plan
    try:
        return ViewPlan(ViewRecipe.from_dict(made.recipe, "field 'plan.recipe'"), made.seed)
    except UserError as e:
        raise UserError(f"cannot read {store.path / STORE_FILE}: {e}; the store is damaged, extract it again") from None


def data_source(store: Store, data: str | None) -> str:
    """The training data of a store: ``data`` (--data, where the images moved since extraction), else the store's own."""
    return data or store.record.dataset.source


def store_dataset(store: Store, data: str | None = None) -> ImageDataset:
    """The store's training data (see ``data_source``), checked to be the images the store was made from."""
    dataset = open_dataset(data_source(store, data))
    check_dataset(store, dataset)
    return dataset
