"""The steps of `pipeline demo` (``pipeline.commands.demo``): what a method's demo trains (``Variant``), the teacher
fitted on every label, its outputs cached over recorded views, the students trained side by side in processes of
their own, and one epoch timed with the teacher cached and run live."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from stages.cache import stats
from stages.cache.teacher_rows import output_info
from stages.training.distill import train
from stages.training.job import DistillJob, OnlineTeacher, build_distill
from stages.training.settings import TrainSettings
from stages.teachers.extract import ExtractResult, TeacherRunner, extract, teacher_info
from stages.cache.store_setup import open_store
from stages.methods import method_class, parse_method
from stages.data.replay import DrawnViews
from stages.teachers.teachers import TeacherSpec, register_teacher
from stages.data.views import ViewPlan, ViewRecipe

from storage import Location, Store
from storage.local_files import written_whole

from pipeline.settings import config

log = logging.getLogger("pipeline")


@dataclass
class Variant:
    """What one ``pipeline demo --method M`` trains: its teachers by store id, its student, and its distilled rows.

    A method's own section in configs/demo.yaml (``methods:``) replaces the default teacher, student and cache
    keys (student_kwargs whole). A composite (``kd+cospress``) fits each part's teacher, stores them side by
    side (``teacher``, ``teacher-cospress``), trains the student of its parts' sections, and has a row for each
    part alone beside the composite.
    """

    method: str
    teachers: dict[str, TrainSettings]  # by teacher id in the store
    outputs: dict[str, list | None]  # cached outputs by teacher id (None: the default)
    student: dict  # the student's settings, but for the method and seed
    rows: dict[str, tuple[str, dict]]  # distilled row name -> (method, method_args)
    needs: tuple[str, ...]

    def job(self, store: str, name: str, **settings) -> DistillJob:
        method, args = ("ce", {}) if name == "ce" else self.rows[name]
        train = TrainSettings(**{**self.student, **settings}, method=method, method_args=args)
        return DistillJob(store, train, teacher_id=None if train.methods.composite else next(iter(self.teachers)))

    def online(self, job: DistillJob, out: Path) -> DistillJob:
        """``job`` with its teachers run live: a composite's parts name their models, their weight files in part order."""
        if not job.train.methods.composite:
            (tid,) = self.teachers
            return dataclasses.replace(
                job,
                online=OnlineTeacher(
                    teacher_name(self.teachers[tid]), str(out / tid / "model.safetensors"), size=self.student["size"]
                ),
            )
        parts = [p for p in job.train.methods.parts if p.teacher]
        method = "+".join(f"{p.method}@{teacher_name(self.teachers[p.teacher])}" for p in parts)
        files = ",".join(dict.fromkeys(str(out / p.teacher / "model.safetensors") for p in parts))
        return dataclasses.replace(
            job,
            train=dataclasses.replace(job.train, method=method),
            online=OnlineTeacher(None, files, size=self.student["size"]),
        )


def variant(cfg: dict, method: str, student: dict, teacher: dict) -> Variant:
    """The demo of ``method`` (one method or a composite of methods) from configs/demo.yaml."""
    methods = parse_method(method)
    parts, composite = [p.method for p in methods.parts], methods.composite
    own = {m: cfg.get("methods", {}).get(m, {}) for m in parts}
    ids = {m: f"teacher-{m}" if composite and "teacher" in own[m] else "teacher" for m in parts}
    teachers = {
        ids[m]: TrainSettings(**config.merge({**cfg["teacher"], **own[m].get("teacher", {})}, teacher), method="ce")
        for m in parts
        if method_class(m).needs
    }
    outputs = {ids[m]: own[m].get("cache", {}).get("outputs") for m in parts if method_class(m).needs}
    base = {**cfg["student"]}
    for m in parts:
        base.update(own[m].get("student", {}))
    # over the method's own defaults (the paper's), for a few epochs on digits
    args = {m: cfg["method_args"].get(m, {}) for m in parts}
    if composite:
        rows = {m: (f"{m}@{ids[m]}", {m: args[m]}) for m in parts}
        rows[method] = ("+".join(f"{m}@{ids[m]}" for m in parts), args)
    else:
        rows = {method: (method, args[method])}
    return Variant(method, teachers, outputs, config.merge(base, student), rows, methods.needs)


def fitted_teacher(settings: TrainSettings, data, val, recipe: ViewRecipe, out: Path) -> tuple[float, float]:
    """Step 1: the teacher, supervised on every label, a fresh view per epoch from its own plan: (val top-1, seconds).

    A teacher fitted before in ``out`` with the same settings is reused (its ``fit.json`` says how it was made)."""
    key = _plain({"settings": dataclasses.asdict(settings), "views": recipe.to_dict(), "data": data.source})
    saved = _read_json(out / FIT_RECORD)
    if saved.get("key") == key and (out / "model.safetensors").is_file():
        log.info("demo 1/4: reusing the teacher in %s (fitted before with the same settings)", out)
        return saved["val_top1"], saved["seconds"]
    if saved:
        log.info("demo 1/4: replacing the teacher in %s, which was fitted with other settings", out)
    log.info("demo 1/4: fitting teacher %s on %s (%d images, all labels)", settings.student, data.source, len(data))
    start, fit_plan = time.perf_counter(), ViewPlan(recipe, seed=1)
    fitted = train(
        settings,
        data,
        val,
        DrawnViews(fit_plan, data, settings.epochs),
        fit_plan,
        out_dir=out,
        weights_name="model.safetensors",
    )
    record = {"key": key, "val_top1": fitted.metrics[-1]["val_top1"], "seconds": time.perf_counter() - start}
    with written_whole(out / FIT_RECORD) as tmp:
        tmp.write_text(json.dumps(record))
    return record["val_top1"], record["seconds"]


# how the demo's teacher and store were made: a rerun reuses what matches
FIT_RECORD, CACHE_RECORD = ("fit.json", "cache.json")


def _plain(value):
    return json.loads(json.dumps(value))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def teacher_name(settings: TrainSettings) -> str:
    """The fitted model as a teacher name: a timm name, or one registered here with the model arguments it was built with."""
    if not settings.student_kwargs:
        return settings.student
    name = f"{settings.student}-demo"
    register_teacher(TeacherSpec(name, settings.student, kwargs=dict(settings.student_kwargs)))
    return name


def cache_teachers(
    teachers: dict, outputs: dict, data, recipe: ViewRecipe, cache_cfg: dict, size: int, out: Path, needs, workers: int
):
    """Step 2, stage one: each teacher's outputs over one plan's recorded views, into OUT/store under its id (with
    statistics for feature methods).

    A store made before for these teachers, plan and cache settings is reused (extraction skips its committed
    units); one made for others is replaced, with a line saying so."""
    where = out / "store"
    key = _plain(
        {
            "teachers": {tid: [t.weights, outputs.get(tid)] for tid, t in teachers.items()},
            "views": recipe.to_dict(),
            "cache": cache_cfg,
            "size": size,
        }
    )
    saved = _read_json(out / CACHE_RECORD)
    if Store.exists(where) and saved.get("key") != key:
        log.info("demo 2/4: replacing the store in %s, made for another teacher or other cache settings", where)
        Location(str(where)).remove_tree()
    log.info("demo 2/4: extracting %d views per image into %s", cache_cfg["views"], where)
    store = open_store(
        where, data, ViewPlan(recipe, seed=0), views=cache_cfg["views"], block=cache_cfg["block"], size=size
    )
    done = []
    for tid, teacher in teachers.items():
        info = teacher_info(
            teacher, output_info(teacher, k=cache_cfg["topk"], outputs=outputs.get(tid) or cache_cfg.get("outputs"))
        )
        done.append(extract(store, data, TeacherRunner(teacher, info), tid, views=cache_cfg["views"], workers=workers))
        if "features" in needs and "features" in info.outputs:
            stats.write_stats(store, tid, data.labels)
    with written_whole(out / CACHE_RECORD) as tmp:
        tmp.write_text(json.dumps({"key": key}))
    return store, ExtractResult(*(sum(getattr(r, f) for r in done) for f in ("units", "skipped", "views", "seconds")))


def student_runs(runs: list[tuple], jobs: list[dict]) -> dict:
    """Step 3, stage two: the same student from scratch and from the cache, one process per core; val top-1 per (fraction, method)."""
    processes = max(1, min(len(jobs), os.cpu_count() or 1))
    log.info("demo 3/4: %d student runs, %d at a time", len(jobs), processes)
    rows: dict = {}
    ctx = multiprocessing.get_context("spawn")  # forking a process that already runs torch threads can hang
    with ProcessPoolExecutor(processes, mp_context=ctx, initializer=_quiet_worker, initargs=(processes,)) as pool:
        for (frac, name, seed), acc in zip(runs, pool.map(_student_run, jobs)):
            rows.setdefault((frac, name), []).append(acc)
            log.info("demo 3/4: %s, labels %.0f%%, seed %d: val top-1 %.4f", name, 100 * frac, seed, acc)
    return rows


def time_epochs(cached: DistillJob, online: DistillJob) -> tuple[float, float]:
    """Step 4, the price of not caching: seconds of one epoch from the cache and one with the teacher(s) live."""
    return build_distill(cached).train().metrics[0]["seconds"], build_distill(online).train().metrics[0]["seconds"]


def _quiet_worker(processes: int) -> None:
    # Each process gets its share of the cores; their per-epoch logs would interleave, so only warnings.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    logging.basicConfig(level=logging.WARNING)


def _student_run(job: dict) -> float:
    """One student run in a worker process: build its distill job, train, return validation top-1."""
    return build_distill(DistillJob.from_dict(job["job"])).train(out_dir=job["out"]).metrics[-1]["val_top1"]
