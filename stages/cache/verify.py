"""Integrity of a store: unit counts, checksums, and a sample of replayed view fingerprints.

``check_store`` reads every committed unit of the plan and of each teacher and
compares it with its commit record, lists the units a teacher still lacks,
and re-renders a sample of views to compare with the plan's fingerprints.
``take_back_damaged`` removes the commit records of damaged units so that the
next extraction writes exactly those again (``pipeline extract --repair``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from storage import Store

from ..data.datasets import ImageDataset
from ..data.replay import StoredViews, ViewRenderer, fingerprint_mismatch, render_batches, take, unit_table
from .store_setup import stored_plan


@dataclass(frozen=True)
class Finding:
    group: str  # "plan" or "teacher <id>"
    view: int
    block: int
    problem: str
    kind: str = (
        "damaged"  # "missing": never committed; "damaged": rewriting fixes it; "replay": it renders differently now
    )


@dataclass
class Report:
    units: int = 0  # committed units read and checked
    views_replayed: int = 0
    findings: list[Finding] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)  # symbolic links inside the store: (link, target)

    @property
    def ok(self) -> bool:
        return not self.findings and not self.links


def teacher_units(store: Store, teacher_id: str) -> set[tuple[int, int]]:
    """The units a finished extraction of ``teacher_id`` has."""
    return set(store.units(store.teacher_info(teacher_id).views))


def _check_group(group, expected: set, name: str, report: Report) -> set[tuple[int, int]]:
    """Check every expected unit of one group; returns the units found sound."""
    committed = group.committed()
    sound = set()
    for v, b in sorted(expected):
        if (v, b) not in committed:
            report.findings.append(
                Finding(name, v, b, "not committed (extraction unfinished or its record deleted)", "missing")
            )
            continue
        report.units += 1
        problem = group.check_unit(v, b)
        if problem:
            report.findings.append(Finding(name, v, b, problem))
        else:
            sound.add((v, b))
    return sound


def check_store(
    store: Store,
    dataset: ImageDataset | None = None,
    teacher_ids: list[str] | None = None,
    replay_fraction: float = 0.01,
    workers: int = 0,
    seed: int = 0,
) -> Report:
    """Everything that can be wrong with a store, unit by unit."""
    report = Report(links=store.path.links())  # writes would go through them, out of the store
    plan = stored_plan(store)  # store.json's recipe, checked as view flags are, whether or not views are replayed
    teacher_ids = store.teacher_ids() if teacher_ids is None else teacher_ids
    plan_units = set().union(*(teacher_units(store, t) for t in teacher_ids)) if teacher_ids else store.plan.committed()
    sound_plan = _check_group(store.plan, plan_units, "plan", report)
    for tid in teacher_ids:
        _check_group(store.teacher(tid), teacher_units(store, tid), f"teacher {tid}", report)
    if dataset is not None and replay_fraction > 0:
        _check_replay(store, plan, dataset, sorted(sound_plan), replay_fraction, workers, seed, report)
    return report


def _check_replay(store, plan, dataset, units, fraction, workers, seed, report) -> None:
    """Re-render a sample of views and compare them with the fingerprints the teacher's views had."""
    source = StoredViews(store, plan, store.num_views)
    param_names = list(plan.fields)
    batches = []
    for v, b in units:
        table = unit_table(source, v, b, None, param_names)  # partners attached before any row is dropped
        n = len(table["id"])
        picked = np.flatnonzero(np.random.default_rng([seed, v, b]).random(n) < fraction)
        if len(picked):
            batch = take({**table, "unit": np.full(n, b)}, picked)
            batch["check"] = np.ones(len(picked), bool)
            batches.append(batch)
    size = store.record.plan.size
    renderer = ViewRenderer(dataset, plan, (size,), size)
    for batch, rendered in render_batches(renderer, batches, param_names, workers, check_column="check"):
        got = rendered["fingerprint"].numpy()
        report.views_replayed += len(got)
        problem = fingerprint_mismatch(batch, got)
        if problem:
            report.findings.append(Finding("plan", int(batch["view"][0]), int(batch["unit"][0]), problem, "replay"))


def take_back_damaged(store: Store, teacher_id: str) -> list[Finding]:
    """Uncommit the damaged units of the plan and of ``teacher_id``, so extraction rewrites them."""
    if teacher_id not in store.teacher_ids():
        return []
    report = check_store(store, teacher_ids=[teacher_id], replay_fraction=0)
    damaged = [f for f in report.findings if f.kind == "damaged"]
    for f in damaged:
        group = store.plan if f.group == "plan" else store.teacher(teacher_id)
        group.uncommit(f.view, f.block)
    return damaged
