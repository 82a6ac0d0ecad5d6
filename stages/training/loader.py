"""The replay loader: an epoch of replayed views as typed batches, with their targets and cached teacher outputs.

``ReplayLoader`` is the one object every training loop iterates: ``pipeline train`` and ``pipeline distill``
(``stages.training.distill.train_one_epoch``), Ray Train workers, sweeps, the benchmarks, and a user's own loop
(``stages.loader.open_cache(...).loader(...)``). It owns the chain from units to batches:

1. ``epoch_units``: the epoch's (view, block) units, each block once (R times with ``repeats``); under
   DDP each rank takes every world-th block (``rank_units``);
2. ``unit_table``: each unit's view parameters (and fingerprints), labels, mixing partners, encoded
   images (tar shards) and cached teacher rows, read whole;
3. ``shuffle_windows`` + ``rebatch``: rows shuffled within a window of units in memory, cut into
   batches of exactly ``batch_size`` (mixing mates and a sample's repeated views kept in one batch);
4. ``render_batches``: the images rendered in loader processes, in order;
5. here, in the main process: fingerprints checked, targets mixed and smoothed with the rendered
   views' own mixing weights, teacher rows decoded (top-k rebuilt at the method's temperature).

Every rank takes exactly ``len(loader)`` batches each epoch (``steps_per_epoch``), so no DDP rank waits on
another. Batches are a pure function of (seed, epoch, rank, world): ``state_dict`` records the epoch and
how many batches were taken, and ``load_state_dict`` resumes mid-epoch with the same batches (the
skipped batches' units are read again, but not rendered).

A batch and its targets are ``stages.training.batch``; a rank's share of an epoch and its steps,
``stages.training.epoch_steps``.
"""

from __future__ import annotations

from itertools import islice
from typing import Iterator, Mapping

import numpy as np
import torch

from storage import UserError

from ..data.image_dataset import ImageDataset
from ..data.replay import (
    StoredViews,
    Table,
    ViewRenderer,
    check_fingerprints,
    epoch_units,
    labelled_mask,
    rebatch,
    render_batches,
    shuffle_windows,
    unit_table,
    window_units,
    with_images,
)
from ..data.views import ViewPlan, normalize
from ..teachers.teacher_sources import TeacherSource
from .batch import Batch, targets
from .epoch_steps import rank_units, resolve_ranks, steps_or_refuse
from ..settings import POSITIVE, Float, declared
from .settings import TrainSettings


def _check_policy(verify: str, ids: np.ndarray, view: int) -> np.ndarray:
    """The rows whose replayed view is fingerprinted: all, about one in a hundred (spread over samples and views), or none."""
    if verify == "all":
        return np.ones(len(ids), bool)
    if verify == "sample":
        return (ids * 7919 + view * 104729) % 100 == 0
    return np.zeros(len(ids), bool)


def _live_size(teachers: Mapping[str, TeacherSource]) -> int | None:
    """The one render size of the live teachers (``source.size`` set), None when none is live."""
    live = {s.size for s in teachers.values() if s.size is not None}
    if len(live) > 1:
        raise UserError(f"live teachers at several sizes ({sorted(live)}): run them at one render size")
    return next(iter(live), None)


class ReplayLoader:
    """Replayed views of a dataset, an epoch at a time, as ``Batch`` es (see the module's docstring).

    Made by ``stages.loader.Cache.loader`` for a user's loop, and by the training loop for its own runs.

    Args:
        dataset: the training images (``ImageDataset``).
        plan: the view plan that renders them.
        views: where the view parameters come from: ``StoredViews`` (a store's plan, replayed and
            checked against its fingerprints) or ``DrawnViews`` (drawn on the fly, nothing stored).
        batch_size: views per batch on this rank; every batch is whole (a last partial one is dropped).
        teachers: teacher sources by name; a cached one's rows are read with each unit and decoded
            into ``Batch.teachers[name]``; a live one (``source.size`` set) gets its views rendered at
            its size into ``Batch.teacher_images`` and is run by the caller.
        temperature: the temperature each cached teacher's logits are softened at (a top-k cache
            rebuilds its tail for it): one value for all, or one per name.
        size: the student's input size (default: the stored plan's render size).
        label_fraction: a stratified share of each class's samples that keep their label; the others get label -1
            and a zero target row (default: every label).
        label_seed: the seed that picks which samples keep their label.
        label_smoothing: timm's smoothing of the target rows.
        seed: fixes the epoch's order (with the epoch number).
        repeats: R > 1 takes R different views of each sample of an epoch's blocks (timm's --aug-repeats).
        window_rows: about how many rows are shuffled together in memory.
        workers: loader processes rendering views (0: in this process).
        verify: replayed views checked against the stored fingerprints: ``"all"``, ``"sample"``
            (about one in a hundred) or ``"none"``.
        normalize: ``(mean, std)`` to hand out float32 normalised images; ``None`` hands out uint8
            images, which the caller normalises on its device (a quarter of the bytes cross the bus).
        rank: this process's rank (default: from torch.distributed, else 0).
        world: the number of ranks (default: from torch.distributed, else 1).

    Returns (iterating it):
        ``len(loader)`` ``Batch`` es of the current epoch (``set_epoch``), each of ``batch_size`` views.

    Example:
        >>> loader = ReplayLoader(dataset, plan, StoredViews(store, plan), 64, teachers={"t": CachedTeacher(store, "t", ["logits"])})
        >>> loader.set_epoch(3)
        >>> for batch in loader:
        ...     step(batch.images, batch.targets, batch.teachers["t"]["logits"])
    """

    def __init__(
        self,
        dataset: ImageDataset,
        plan: ViewPlan,
        views,
        batch_size: int,
        *,
        teachers: Mapping[str, TeacherSource] | None = None,
        temperature: float | tuple | Mapping[str, float | tuple] = 1.0,
        size: int | None = None,
        label_fraction: float = 1.0,
        label_seed: int = 0,
        label_smoothing: float = 0.0,
        seed: int = 0,
        repeats: int = 1,
        window_rows: int = 16384,
        workers: int = 0,
        verify: str = "sample",
        normalize: tuple[tuple, tuple] | None = None,
        rank: int | None = None,
        world: int | None = None,
    ):
        self.dataset, self.plan, self.source = dataset, plan, views
        self.teachers = dict(teachers or {})
        self.rank, self.world = resolve_ranks(rank, world)
        given = dict(batch_size=batch_size, workers=workers, seed=seed, repeats=repeats, verify=verify)
        given.update(label_smoothing=label_smoothing, label_fraction=label_fraction, label_seed=label_seed)
        _check_arguments({**given, "window_rows": window_rows}, temperature, list(self.teachers), normalize)
        # None: views drawn now, nothing to verify
        self.plan_size = views.store.record.plan.size if isinstance(views, StoredViews) else None
        self.size = size or self.plan_size
        if self.size is None:
            raise UserError("views drawn on the fly have no stored render size: pass size (the student's input size)")
        if not isinstance(self.size, (int, np.integer)) or self.size < 1:
            raise UserError(f"size must be a positive number of pixels, not {self.size!r}")
        self.teacher_size = _live_size(self.teachers)
        self.renderer = ViewRenderer(
            dataset, plan, (self.size,) if self.teacher_size is None else (self.size, self.teacher_size), self.plan_size
        )
        self.batch_size, self.seed, self.repeats, self.workers, self.verify = batch_size, seed, repeats, workers, verify
        if not 1 <= repeats <= views.num_views:
            raise UserError(
                f"repeats {repeats} needs {repeats} different views of each sample in an epoch but there are {views.num_views}: "
                f"use repeats between 1 and {views.num_views}, or extract more views"
            )
        self.window = window_units(window_rows, views.block, repeats)  # a block's repeated views share a window
        self.temperature = temperature
        # The labels the student may use: a stratified fraction of each class keeps its own, the others get -1.
        self.labels = np.where(labelled_mask(dataset.labels, label_fraction, label_seed), dataset.labels, -1)
        self.smoothing = label_smoothing
        self.normalize = None if normalize is None else (tuple(normalize[0]), tuple(normalize[1]))
        self.steps = steps_or_refuse(
            len(dataset),
            views.block,
            batch_size,
            self.world,
            repeats,
            name="batch size",
            unit="rank",
            fix="lower the batch size",
        )
        self.epoch, self.position, self._resume = 0, 0, 0

    def __len__(self) -> int:
        """Batches (optimiser steps) per epoch on this rank: the same on every rank, every epoch."""
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        """Take ``epoch``'s batches at the next iteration (as ``DistributedSampler.set_epoch``); a position loaded for
        this same epoch by ``load_state_dict`` is kept."""
        if epoch != self.epoch:
            self.epoch, self._resume = epoch, 0

    def state_dict(self) -> dict:
        """The epoch and the batches of it already taken, with what fixes the order (to refuse a resume under other settings)."""
        return {"epoch": self.epoch, "position": self.position, **self._order_key()}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` (from ``state_dict``) was taken: the next iteration yields the rest of its epoch, the same batches."""
        wanted = self._order_key()
        changed = [k for k in wanted if state.get(k) != wanted[k]]
        if changed:
            k = changed[0]
            raise UserError(
                f"the loader state was saved with {k} {state.get(k)} but this loader has {k} {wanted[k]}: resume with the same settings"
            )
        self.epoch, self.position, self._resume = int(state["epoch"]), int(state["position"]), int(state["position"])

    def _order_key(self) -> dict:
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "repeats": self.repeats,
            "rank": self.rank,
            "world": self.world,
        }

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self.epoch, self._resume
        self._resume, self.position = 0, start
        check = "check" if self.plan_size is not None else None
        for table, rendered in render_batches(
            self.renderer, self.row_batches(start), list(self.plan.fields), self.workers, check
        ):
            if check:
                check_fingerprints(table, rendered["fingerprint"].numpy(), self.source.store, table["check"])
            self.position += 1
            yield self._batch(table, rendered)
        if self.position == self.steps:  # a whole epoch taken: the next iteration is the next epoch's
            self.epoch, self.position = epoch + 1, 0

    def row_batches(self, start: int = 0) -> Iterator[Table]:
        """The current epoch's batches from batch ``start`` on, as tables before rendering: ids, views, view parameters,
        labels and stored teacher rows (what the store gives; ``teacher_outputs`` decodes the rows)."""
        rng = np.random.default_rng([self.seed, self.epoch, 2] + ([self.rank] if self.world > 1 else []))
        # With repeats, a sample's views travel together: one decode of its image renders all of them (see shuffle_windows).
        shuffled = shuffle_windows(self._tables(self.epoch), self.window, rng, by_sample=self.repeats > 1)
        # Every rank takes exactly ``steps`` batches (see steps_per_epoch); its other rows wait for another epoch.
        return islice(rebatch(shuffled, self.batch_size, drop_last=True), start, self.steps)

    def teacher_outputs(self, table: Table) -> dict[str, dict[str, torch.Tensor]]:
        """The cached teachers' outputs for a batch table, by name (float32; top-k rows rebuilt at their temperature)."""
        return {
            name: s.outputs(table, None, self._temperature(name)) for name, s in self.teachers.items() if s.size is None
        }

    def _tables(self, epoch: int) -> Iterator[Table]:
        """This rank's units of ``epoch``, each a table of rows: ids, view parameters, labels, teacher rows."""
        units = epoch_units(
            epoch,
            self.source.num_views,
            self.source.num_blocks,
            self.seed,
            self.repeats,
            self.plan.recipe.mix_pair_views,
        )
        for v, b in rank_units(units, self.rank, self.world):
            # a mixing partner is in the same unit
            table = unit_table(self.source, v, b, self.labels, list(self.plan.fields))
            table = with_images(table, self.dataset)  # shard datasets: the unit's images in one pass
            for source in self.teachers.values():
                table.update(source.unit_rows(v, b, len(table["id"])))
            if self.plan_size is not None:
                table["check"] = _check_policy(self.verify, table["id"], v)
            yield table

    def _batch(self, table: Table, rendered: dict) -> Batch:
        images = rendered["views"][0]
        lam = rendered["lam"][:, 0]
        partner_labels = None
        if "mix_partner" in table:  # a mixed view's target is the mixed one, weighted by the student's own lam
            partner = table["mix_partner"]
            partner_labels = np.where(partner >= 0, self.labels[np.maximum(partner, 0)], -1)
        target = targets(
            table["label"],
            self.dataset.num_classes,
            self.smoothing,
            partner_labels,
            lam.numpy() if partner_labels is not None else None,
        )
        return Batch(
            images=images if self.normalize is None else normalize(images, *self.normalize),
            targets=target,
            teachers=self.teacher_outputs(table),
            ids=torch.from_numpy(np.asarray(table["id"], np.int64)),
            views=torch.from_numpy(np.asarray(table["view"], np.int64)),
            lam=lam,
            teacher_images=rendered["views"][1] if self.teacher_size is not None else None,
            rows=table,
        )

    def _temperature(self, name: str):
        return self.temperature[name] if isinstance(self.temperature, Mapping) else self.temperature


def _check_arguments(given: dict, temperature, names: list[str], normalize) -> None:
    """A caller's values, checked as the same settings of ``pipeline distill`` are (``TrainSettings``), in one line
    naming the argument, before a worker or a batch would meet them; the temperatures (one value, a tuple of one per
    composite part, or a mapping by teacher name) and ``normalize``'s (mean, std) the same way."""
    checks = declared(TrainSettings)
    for name, value in given.items():
        checks[name](value, name)
    per_name = temperature if isinstance(temperature, Mapping) else dict.fromkeys(names, temperature)
    stray = sorted(set(per_name) - set(names))
    if stray:
        raise UserError(f"temperature names {', '.join(map(str, stray))}, which the loader does not read: read {names}")
    missing = [name for name in names if name not in per_name]
    if missing:
        raise UserError(f"temperature has no value for teacher {missing[0]}: give one per teacher read, or one number")
    for name, t in per_name.items():
        for value in t if isinstance(t, tuple) else (t,):
            POSITIVE(value, f"temperature of {name}")
    if normalize is not None:
        for name, values, check in zip(("mean", "std"), normalize, (Float(), POSITIVE)):
            if isinstance(values, str) or not isinstance(values, (list, tuple)) or len(values) != 3:
                raise UserError(f"{name} takes 3 numbers, one per channel (R, G, B), not {values!r}")
            for v in values:
                check(v, name)
