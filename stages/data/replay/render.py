"""Rendering batches of views in loader workers, in the batches' order, and checking them against recorded fingerprints.

A batch table becomes a list of ``Item`` (one row each: its parameters, its mate's row, its encoded image);
``ViewRenderer`` renders a whole batch per index, so mates share their renders, and ``render_batches`` keeps the
batch order whatever the number of workers, so the result never depends on it.
"""

from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from storage import Store, UserError
from storage.errors import remote_user_error

from ..image_dataset import ImageDataset
from ..views import ViewPlan, fingerprint, row
from .tables import IMAGES, PARTNER, Table, with_images


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
            "build unit tables through stages.data.replay.with_partner_params before shuffling"
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
