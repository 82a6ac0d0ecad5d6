"""`pipeline demo`: the whole product on embedded data, with the table that says whether it paid off.

Fits a teacher on all labels of ``digits``, extracts its outputs over recorded
views into a store, then trains the same small student from scratch and by
distillation from the cache for a few seeds, with labels for a fraction of the
images (the setting where a cache of teacher outputs helps) and with all
labels (the control). Also times one epoch of distillation with the teacher
run online, against the cache.

A method may bring its own teacher, student and cache outputs (``methods:`` in
configs/demo.yaml): ``--method cospress`` fits a small DINOv2-shaped ViT and
caches its tokens for a smaller ViT student; ``--method gpd`` trains the
usual student beside its widened dynamic teacher. ``--method kd+cospress``
fits both teachers, caches them side by side in one store, and trains the
student on each part alone and on both at once (``Variant``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import logging
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from stages.cache import stats
from stages.cache.teacher_rows import output_info
from stages.data.datasets import open_dataset
from stages.settings import build
from stages.training.distill import train
from stages.training.job import DistillJob, OnlineTeacher, build_distill
from stages.training.settings import TrainSettings
from stages.teachers.extract import ExtractResult, TeacherRunner, extract, teacher_info
from stages.cache.store_setup import open_store
from stages.methods import is_composite, list_methods, method_class, method_needs, parse_method
from stages.data.replay import DrawnViews
from stages.teachers.teachers import TeacherSpec, build_teacher, register_teacher
from stages.data.views import ViewPlan, ViewRecipe

from storage import Location, Store
from storage.location import written_whole

from pipeline.settings import config
from pipeline.runs.plots import plot_runs

log = logging.getLogger("pipeline")


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the embedded default: teacher, cache, scratch vs distilled students on digits")
    p.add_argument(
        "--out",
        help="where the teacher, store and students go; a second run reuses the teacher and store that still match "
        "(default: runs/demo, runs/demo-METHOD for another --method)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        help="student seeds of the partial-label rows; the full-label control uses one (default: 3, from configs/demo.yaml)",
    )
    p.add_argument(
        "--label-fraction", type=float, help="labels the student may use (default: 0.2, from configs/demo.yaml)"
    )
    p.add_argument(
        "--epochs", type=int, help="student epochs (default: 20, from configs/demo.yaml; cospress 15, gpd 10)"
    )
    p.add_argument(
        "--teacher-epochs", type=int, help="teacher epochs (default: from configs/demo.yaml: 10; cospress's ViT 15)"
    )
    p.add_argument(
        "--method",
        default="kd",
        help=f"distillation method of the distilled rows: {', '.join(m for m in list_methods() if m != 'ce')}, "
        "or several joined by + (kd+cospress: each part from its own teacher, alone and together) (default: kd)",
    )
    p.add_argument("--workers", type=int, default=0, help="loader processes rendering views (default: 0)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> None:
    cfg = config.recipe("demo")
    out = Path(
        args.out or ("runs/demo" if args.method == "kd" else f"runs/demo-{args.method}")
    )  # each variant its own teacher and store
    seeds = list(range(args.seeds)) if args.seeds else cfg["seeds"]
    fraction = cfg["label_fraction"] if args.label_fraction is None else args.label_fraction
    size = cfg["size"]
    data, val = open_dataset(cfg["data"]), open_dataset(cfg["data"], "val")
    recipe = build(ViewRecipe, cfg["views"], "configs/demo.yaml views")
    common = {"size": size, "workers": args.workers}
    demo = variant(cfg, args.method, {"epochs": args.epochs, **common}, {"epochs": args.teacher_epochs, **common})
    config.save(
        out / "config.yaml",
        {"command": "demo", "seeds": seeds, "label_fraction": fraction, **cfg, "teacher_runs": demo.teachers},
    )

    fits = {tid: fitted_teacher(settings, data, val, recipe, out / tid) for tid, settings in demo.teachers.items()}
    teachers = {
        tid: build_teacher(_teacher_name(s), weights=str(out / tid / "model.safetensors"), input_size=size)
        for tid, s in demo.teachers.items()
    }
    store, extracted = cache_teachers(
        teachers, demo.outputs, data, recipe, cfg["cache"], size, out, demo.needs, args.workers
    )

    control = [(1.0, seeds[:1])] if fraction != 1.0 else []  # the full-label control: one seed
    runs = [
        (frac, name, seed)
        for frac, run_seeds in [(fraction, seeds), *control]
        for name in ("ce", *demo.rows)
        for seed in run_seeds
    ]
    jobs = [
        {
            "job": demo.job(str(store.path), name, seed=seed, label_fraction=frac).to_dict(),
            "out": str(out / f"student-{name}-labels{frac:g}-seed{seed}"),
        }
        for frac, name, seed in runs
    ]
    rows = student_runs(runs, jobs)
    labels = [f"{'scratch' if name == 'ce' else f'distilled ({name})'}, {frac:.0%} labels" for frac, name, _ in runs]
    picture = plot_runs(
        [job["out"] for job in jobs],
        out / "students.png",
        labels,
        title=f"digits: students from scratch and from the cache ({args.method})",
    )
    log.info("demo 3/4: curves of every student run -> %s", picture)

    log.info("demo 4/4: timing an epoch from the cache and with the teacher run online")
    timing = demo.job(str(store.path), args.method, epochs=1, label_fraction=fraction)
    cache_s, online_s = time_epochs(timing, demo.online(timing, out))

    print_table(
        data=data,
        val=val,
        size=size,
        teachers=teachers,
        fits=fits,
        student=demo.student,
        names=list(demo.rows),
        fraction=fraction,
        rows=rows,
        extracted=extracted,
        cache_epoch_s=cache_s,
        online_epoch_s=online_s,
        out=out,
    )


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
        return DistillJob(store, train, teacher_id=None if is_composite(method) else next(iter(self.teachers)))

    def online(self, job: DistillJob, out: Path) -> DistillJob:
        """``job`` with its teachers run live: a composite's parts name their models, their weight files in part order."""
        if not is_composite(job.train.method):
            (tid,) = self.teachers
            return dataclasses.replace(
                job,
                online=OnlineTeacher(
                    _teacher_name(self.teachers[tid]), str(out / tid / "model.safetensors"), size=self.student["size"]
                ),
            )
        parts = [p for p in parse_method(job.train.method) if p.teacher]
        method = "+".join(f"{p.method}@{_teacher_name(self.teachers[p.teacher])}" for p in parts)
        files = ",".join(dict.fromkeys(str(out / p.teacher / "model.safetensors") for p in parts))
        return dataclasses.replace(
            job,
            train=dataclasses.replace(job.train, method=method),
            online=OnlineTeacher(None, files, size=self.student["size"]),
        )


def variant(cfg: dict, method: str, student: dict, teacher: dict) -> Variant:
    """The demo of ``method`` (one method or a composite of methods) from configs/demo.yaml."""
    parts = [p.method for p in parse_method(method)]
    own = {m: cfg.get("methods", {}).get(m, {}) for m in parts}
    composite = is_composite(method)
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
    args = {
        m: cfg["method_args"].get(m, {}) for m in parts
    }  # over the method's own defaults (the paper's), for a few epochs on digits
    if composite:
        rows = {m: (f"{m}@{ids[m]}", {m: args[m]}) for m in parts}
        rows[method] = ("+".join(f"{m}@{ids[m]}" for m in parts), args)
    else:
        rows = {method: (method, args[method])}
    return Variant(method, teachers, outputs, config.merge(base, student), rows, method_needs(method))


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


FIT_RECORD, CACHE_RECORD = (
    "fit.json",
    "cache.json",
)  # how the demo's teacher and store were made: a rerun reuses what matches


def _plain(value):
    return json.loads(json.dumps(value))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _teacher_name(settings: TrainSettings) -> str:
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


def _params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"


def print_table(
    *, data, val, size, teachers, fits, student, names, fraction, rows, extracted, cache_epoch_s, online_epoch_s, out
):
    """The demo's table: each teacher, the student from scratch, and each distilled row (``names``) with its wins over scratch."""
    from stages.training.student import build_student

    student_model = build_student(student["student"], data.num_classes, 0, **student.get("student_kwargs", {}))
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731

    def spread(accs):
        return f"{pct(statistics.mean(accs))} ± {100 * statistics.stdev(accs):.1f}" if len(accs) > 1 else pct(accs[0])

    print()
    print(f"digits: {len(data):,} training / {len(val):,} validation images at {size} px")
    described = "; ".join(f"teacher {t.spec.name} ({_params(t)} parameters)" for t in teachers.values())
    print(f"{described}; student {student['student']} ({_params(student_model)} parameters)")
    print()
    table = [("model", "labels used", "val top-1 (seeds)", "distilled wins")]
    table += [(f"teacher {t.spec.name}", pct(1.0), pct(fits[tid][0]), "") for tid, t in teachers.items()]
    for frac in dict.fromkeys([fraction, 1.0]):
        scratch = rows[(frac, "ce")]
        tag = " (control)" if frac == 1.0 and fraction != 1.0 else ""
        n = f" ({len(scratch)})"
        table.append(("student from scratch" + tag, pct(frac), spread(scratch) + n, ""))
        for name in names:
            distilled = rows[(frac, name)]
            wins = sum(d > s for d, s in zip(distilled, scratch))
            table.append(
                (
                    f"student distilled ({name}, cache)" + tag,
                    pct(frac),
                    spread(distilled) + n,
                    f"{wins} of {len(distilled)}",
                )
            )
    first = max(len(r[0]) for r in table) + 2
    for name, labels, top1, wins in table:
        print(f"{name:<{first}}{labels:>12}{top1:>22}{wins:>16}")
    print()
    made = (
        f"{extracted.views:,} views in {extracted.seconds:.1f} s ({extracted.views / max(extracted.seconds, 1e-9):,.0f} views/s)"
        if extracted.units
        else f"reused ({extracted.skipped} units committed by an earlier run)"
    )
    print(f"teacher fit: {sum(s for _, s in fits.values()):.0f} s; extraction: {made}")
    print(
        f"distillation, seconds per epoch: from cache {cache_epoch_s:.2f}, teacher online {online_epoch_s:.2f} ({online_epoch_s / cache_epoch_s:.1f}x)"
    )
    print()
    print(
        f"The teacher was trained on every label. In the {pct(fraction)} rows the student's cross-entropy sees the labels of "
        f"{pct(fraction)} of the training images, while the cached teacher outputs cover all of them."
    )
    if len(names) > 1:
        print(
            f"The {names[-1]} rows train one student on every part at once, each part reading its own cached teacher; the rows above it train each part alone."
        )
    if "cospress" in names[-1]:
        print(
            "CosPress trains the student on the teacher's tokens alone; its val top-1 is that of a linear classifier trained on the detached features"
            + (" (beside the composite's other parts)." if len(names) > 1 else ".")
        )
    print(
        f"Everything is under {out}: {', '.join(f'{tid}/' for tid in teachers)}, store/, one directory per student run (metrics.jsonl, student.safetensors)."
    )
