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
usual student beside its widened dynamic teacher.
"""

from __future__ import annotations

import dataclasses
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
from stages.teachers.extract import TeacherRunner, extract, teacher_info
from stages.cache.store_setup import open_store
from stages.methods import list_methods, method_class
from stages.data.replay import DrawnViews
from stages.teachers.teachers import TeacherSpec, build_teacher, register_teacher
from stages.data.views import ViewPlan, ViewRecipe

from storage import Location, Store
from storage.location import written_whole

from . import config
from .report import plot_runs

log = logging.getLogger("pipeline")


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the embedded default: teacher, cache, scratch vs distilled students on digits")
    p.add_argument("--out", help="where the teacher, store and students go; a second run reuses the teacher and store that still match "
                   "(default: runs/demo, runs/demo-METHOD for another --method)")
    p.add_argument("--seeds", type=int, help="student seeds of the partial-label rows; the full-label control uses one (default: 3, from configs/demo.yaml)")
    p.add_argument("--label-fraction", type=float, help="labels the student may use (default: 0.2, from configs/demo.yaml)")
    p.add_argument("--epochs", type=int, help="student epochs (default: 20, from configs/demo.yaml; cospress 15, gpd 10)")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs (default: from configs/demo.yaml: 10; cospress's ViT 15)")
    p.add_argument("--method", default="kd", help=f"distillation method of the distilled rows: {', '.join(m for m in list_methods() if m != 'ce')} (default: kd)")
    p.add_argument("--workers", type=int, default=0, help="loader processes rendering views (default: 0)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> None:
    cfg = config.recipe("demo")
    out = Path(args.out or ("runs/demo" if args.method == "kd" else f"runs/demo-{args.method}"))  # each variant its own teacher and store
    seeds = list(range(args.seeds)) if args.seeds else cfg["seeds"]
    fraction = cfg["label_fraction"] if args.label_fraction is None else args.label_fraction
    size = cfg["size"]
    data, val = open_dataset(cfg["data"]), open_dataset(cfg["data"], "val")
    recipe = build(ViewRecipe, cfg["views"], "configs/demo.yaml views")
    common = {"size": size, "workers": args.workers}
    method = args.method
    # A method's own teacher, student and cache sections replace the defaults' keys (student_kwargs whole).
    own = cfg.get("methods", {}).get(method, {})
    teacher_settings = TrainSettings(**config.merge({**cfg["teacher"], **own.get("teacher", {})}, {"epochs": args.teacher_epochs}, common), method="ce")
    student_base = config.merge({**cfg["student"], **own.get("student", {})}, {"epochs": args.epochs}, common)
    cache_cfg = {**cfg["cache"], **own.get("cache", {})}
    method_args = cfg["method_args"].get(method, {})  # over the method's own defaults (the paper's), for a few epochs on digits
    needs = method_class(method).needs
    config.save(out / "config.yaml", {"command": "demo", "seeds": seeds, "label_fraction": fraction, **cfg, "teacher_run": teacher_settings})

    teacher_acc, teacher_fit_s = fitted_teacher(teacher_settings, data, val, recipe, out / "teacher")
    teacher = build_teacher(_teacher_name(teacher_settings), weights=str(out / "teacher" / "model.safetensors"), input_size=size)
    store, extracted = cache_teacher(teacher, data, recipe, cache_cfg, size, out, needs, args.workers)

    control = [(1.0, seeds[:1])] if fraction != 1.0 else []  # the full-label control: one seed
    runs = [(frac, name, seed) for frac, run_seeds in [(fraction, seeds), *control] for name in ("ce", method) for seed in run_seeds]
    jobs = [
        {
            "job": DistillJob(str(store.path), TrainSettings(**student_base, method=name, method_args=method_args if name != "ce" else {}, seed=seed,
                                                             label_fraction=frac), teacher_id="teacher").to_dict(),
            "out": str(out / f"student-{name}-labels{frac:g}-seed{seed}"),
        }
        for frac, name, seed in runs
    ]
    rows = student_runs(runs, jobs)
    labels = [f"{'scratch' if name == 'ce' else f'distilled ({name})'}, {frac:.0%} labels" for frac, name, _ in runs]
    picture = plot_runs([job["out"] for job in jobs], out / "students.png", labels, title=f"digits: students from scratch and from the cache ({method})")
    log.info("demo 3/4: curves of every student run -> %s", picture)

    log.info("demo 4/4: timing an epoch from the cache and with the teacher run online")
    timing = DistillJob(str(store.path), TrainSettings(**{**student_base, "epochs": 1}, method=method, method_args=method_args, label_fraction=fraction),
                        teacher_id="teacher")
    online = OnlineTeacher(teacher.spec.name, weights=str(out / "teacher" / "model.safetensors"), size=size)
    cache_s, online_s = time_epochs(timing, online)

    print_table(
        data=data, val=val, size=size, teacher=teacher, teacher_acc=teacher_acc, teacher_fit_s=teacher_fit_s,
        student=student_base, method=method, fraction=fraction, rows=rows, extracted=extracted,
        cache_epoch_s=cache_s, online_epoch_s=online_s, out=out,
    )


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
    fitted = train(settings, data, val, DrawnViews(fit_plan, data, settings.epochs), fit_plan, out_dir=out, weights_name="model.safetensors")
    record = {"key": key, "val_top1": fitted.metrics[-1]["val_top1"], "seconds": time.perf_counter() - start}
    with written_whole(out / FIT_RECORD) as tmp:
        tmp.write_text(json.dumps(record))
    return record["val_top1"], record["seconds"]


FIT_RECORD, CACHE_RECORD = "fit.json", "cache.json"  # how the demo's teacher and store were made: a rerun reuses what matches


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


def cache_teacher(teacher, data, recipe: ViewRecipe, cache_cfg: dict, size: int, out: Path, needs, workers: int):
    """Step 2, stage one: the teacher's outputs over recorded views, into OUT/store (with statistics for feature methods).

    A store made before for this teacher, plan and cache settings is reused (extraction skips its committed
    units); one made for another is replaced, with a line saying so."""
    where, key = out / "store", _plain({"weights": teacher.weights, "views": recipe.to_dict(), "cache": cache_cfg, "size": size})
    saved = _read_json(out / CACHE_RECORD)
    if Store.exists(where) and saved.get("key") != key:
        log.info("demo 2/4: replacing the store in %s, made for another teacher or other cache settings", where)
        Location(str(where)).remove_tree()
    log.info("demo 2/4: extracting %d views per image into %s", cache_cfg["views"], where)
    info = teacher_info(teacher, output_info(teacher, k=cache_cfg["topk"], outputs=cache_cfg.get("outputs")))
    store = open_store(where, data, ViewPlan(recipe, seed=0), views=cache_cfg["views"], block=cache_cfg["block"], size=size)
    extracted = extract(store, data, TeacherRunner(teacher, info), "teacher", views=cache_cfg["views"], workers=workers)
    with written_whole(out / CACHE_RECORD) as tmp:
        tmp.write_text(json.dumps({"key": key}))
    if "features" in needs:
        stats.write_stats(store, "teacher", data.labels)
    return store, extracted


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


def time_epochs(timing: DistillJob, online: OnlineTeacher) -> tuple[float, float]:
    """Step 4, the price of not caching: seconds of one epoch from the cache and one with the teacher live."""
    cache_s = build_distill(timing).train().metrics[0]["seconds"]
    online_s = build_distill(dataclasses.replace(timing, online=online)).train().metrics[0]["seconds"]
    return cache_s, online_s


def _quiet_worker(processes: int) -> None:
    # Each process gets its share of the cores; their per-epoch logs would interleave, so only warnings.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))
    logging.basicConfig(level=logging.WARNING)


def _student_run(job: dict) -> float:
    """One student run in a worker process: build its distill job, train, return validation top-1."""
    return build_distill(DistillJob.from_dict(job["job"])).train(out_dir=job["out"]).metrics[-1]["val_top1"]


def _params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"


def print_table(*, data, val, size, teacher, teacher_acc, teacher_fit_s, student, method, fraction, rows, extracted, cache_epoch_s, online_epoch_s, out):
    from stages.training.student import build_student

    student_model = build_student(student["student"], data.num_classes, 0, **student.get("student_kwargs", {}))
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731

    def spread(accs):
        return f"{pct(statistics.mean(accs))} ± {100 * statistics.stdev(accs):.1f}" if len(accs) > 1 else pct(accs[0])

    print()
    print(f"digits: {len(data):,} training / {len(val):,} validation images at {size} px")
    print(f"teacher {teacher.spec.name} ({_params(teacher)} parameters); student {student['student']} ({_params(student_model)} parameters)")
    print()
    table = [("model", "labels used", "val top-1 (seeds)", "distilled wins"), (f"teacher {teacher.spec.name}", pct(1.0), pct(teacher_acc), "")]
    for frac in dict.fromkeys([fraction, 1.0]):
        scratch, distilled = rows[(frac, "ce")], rows[(frac, method)]
        wins = sum(d > s for d, s in zip(distilled, scratch))
        tag = " (control)" if frac == 1.0 and fraction != 1.0 else ""
        n = f" ({len(scratch)})"
        table.append(("student from scratch" + tag, pct(frac), spread(scratch) + n, ""))
        table.append((f"student distilled ({method}, cache)" + tag, pct(frac), spread(distilled) + n, f"{wins} of {len(distilled)}"))
    first = max(len(r[0]) for r in table) + 2
    for name, labels, top1, wins in table:
        print(f"{name:<{first}}{labels:>12}{top1:>22}{wins:>16}")
    print()
    made = (f"{extracted.views:,} views in {extracted.seconds:.1f} s ({extracted.views / max(extracted.seconds, 1e-9):,.0f} views/s)" if extracted.units
            else f"reused ({extracted.skipped} units committed by an earlier run)")
    print(f"teacher fit: {teacher_fit_s:.0f} s; extraction: {made}")
    print(f"distillation, seconds per epoch: from cache {cache_epoch_s:.2f}, teacher online {online_epoch_s:.2f} ({online_epoch_s / cache_epoch_s:.1f}x)")
    print()
    print(
        f"The teacher was trained on every label. In the {pct(fraction)} rows the student's cross-entropy sees the labels of "
        f"{pct(fraction)} of the training images, while the cached teacher outputs cover all of them."
    )
    if method == "cospress":
        print("CosPress trains the student on the teacher's tokens alone; its val top-1 is that of a linear classifier trained on the detached features.")
    print(f"Everything is under {out}: teacher/, store/, one directory per student run (metrics.jsonl, student.safetensors).")
