"""`pipeline demo`: the whole product on embedded data, with the table that says whether it paid off.

Fits a teacher on all labels of ``digits``, extracts its outputs over recorded
views into a store, then trains the same small student from scratch and by
distillation from the cache for a few seeds, with labels for a fraction of the
images (the setting where a cache of teacher outputs helps) and with all
labels (the control). Also times one epoch of distillation with the teacher
run online, against the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path

from stages import stats
from stages.cache import output_info
from stages.datasets import open_dataset
from stages.distill import CachedTeacher, LiveTeacher, TrainSettings, train
from stages.extract import TeacherRunner, extract, open_store, teacher_info
from stages.methods import method_class
from stages.replay import DrawnViews, StoredViews
from stages.teachers import build_teacher
from stages.views import ViewPlan, ViewRecipe

from . import config

log = logging.getLogger("pipeline")


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the embedded default: teacher, cache, scratch vs distilled students on digits")
    p.add_argument("--out", default="runs/demo", help="where the teacher, store and students go (default: runs/demo)")
    p.add_argument("--seeds", type=int, help="student seeds per setting (default: 3, from configs/demo.yaml)")
    p.add_argument("--label-fraction", type=float, help="labels the student may use (default: 0.2, from configs/demo.yaml)")
    p.add_argument("--epochs", type=int, help="student epochs (default: 20, from configs/demo.yaml)")
    p.add_argument("--teacher-epochs", type=int, help="teacher epochs (default: 15, from configs/demo.yaml)")
    p.add_argument("--method", default="kd", help="distillation method of the distilled rows: kd, dkd, dist, kdpp, srd (default: kd)")
    p.add_argument("--workers", type=int, default=0, help="loader processes rendering views (default: 0)")
    p.set_defaults(func=run_demo)


def run_demo(args) -> None:
    cfg = config.recipe("demo")
    out = Path(args.out)
    seeds = list(range(args.seeds)) if args.seeds else cfg["seeds"]
    fraction = cfg["label_fraction"] if args.label_fraction is None else args.label_fraction
    size = cfg["size"]
    data, val = open_dataset(cfg["data"]), open_dataset(cfg["data"], "val")
    recipe = config.build(ViewRecipe, cfg["views"], "configs/demo.yaml views")
    common = {"size": size, "workers": args.workers}
    teacher_settings = TrainSettings(**config.merge(cfg["teacher"], {"epochs": args.teacher_epochs}, common), method="ce")
    student_base = config.merge(cfg["student"], {"epochs": args.epochs}, common)
    method = args.method
    method_args = config.merge(config.recipe(f"methods/{method}").get("method_args", {}), cfg["method_args"].get(method, {}))
    needs = method_class(method).needs
    config.save(out / "config.yaml", {"command": "demo", "seeds": seeds, "label_fraction": fraction, **cfg, "teacher_run": teacher_settings})

    # 1. The teacher: supervised on every label, a fresh view per epoch from its own plan.
    log.info("demo 1/4: fitting teacher %s on %s (%d images, all labels)", teacher_settings.student, cfg["data"], len(data))
    t0 = time.perf_counter()
    fit_plan = ViewPlan(recipe, seed=1)
    fitted = train(teacher_settings, data, val, DrawnViews(fit_plan, data, teacher_settings.epochs), fit_plan, out_dir=out / "teacher", weights_name="model.safetensors")
    teacher_fit_s = time.perf_counter() - t0
    teacher_acc = fitted.metrics[-1]["val_top1"]
    weights = out / "teacher" / "model.safetensors"

    # 2. Stage one: its outputs over recorded views, into a store.
    cache_cfg = cfg["cache"]
    log.info("demo 2/4: extracting %d views per image into %s", cache_cfg["views"], out / "store")
    teacher = build_teacher(teacher_settings.student, weights=str(weights), input_size=size)
    info = teacher_info(teacher, output_info(teacher, k=cache_cfg["topk"]))
    plan = ViewPlan(recipe, seed=0)
    store = open_store(out / "store", data, plan, views=cache_cfg["views"], block=cache_cfg["block"], size=size)
    extracted = extract(store, data, TeacherRunner(teacher, info), "teacher", views=cache_cfg["views"], workers=args.workers)
    if "features" in needs:
        stats.write_stats(store, "teacher", data.labels)
    cached = CachedTeacher(store, "teacher", needs)
    views = StoredViews(store, plan, cached.num_views)

    # 3. Stage two: the same student from scratch and from the cache, seed by seed.
    quiet = [logging.getLogger(n) for n in ("stages", "pipeline.progress")]
    for logger in quiet:
        logger.setLevel(logging.WARNING)
    rows, epoch_s = {}, []
    try:
        for frac in dict.fromkeys([fraction, 1.0]):
            for name in ("ce", method):
                accs = []
                for seed in seeds:
                    s = TrainSettings(**student_base, method=name, method_args=method_args if name == method else {}, seed=seed, label_fraction=frac)
                    run = train(s, data, val, views, plan, cached if name == method else None, out_dir=out / f"student-{name}-labels{frac:g}-seed{seed}")
                    accs.append(run.metrics[-1]["val_top1"])
                    if name == method:
                        epoch_s += [m["seconds"] for m in run.metrics]
                    log.info("demo 3/4: %s, labels %.0f%%, seed %d: val top-1 %.4f", name, 100 * frac, seed, accs[-1])
                rows[(frac, name)] = accs

        # 4. The price of not caching: one epoch with the teacher run live on the same views.
        log.info("demo 4/4: timing distillation with the teacher run online")
        online = TrainSettings(**{**student_base, "epochs": 1}, method=method, method_args=method_args, label_fraction=fraction)
        live = LiveTeacher(teacher, needs, class_means=cached.class_means())
        online_s = train(online, data, None, views, plan, live).metrics[0]["seconds"]
    finally:
        for logger in quiet:
            logger.setLevel(logging.NOTSET)

    print_table(
        data=data, val=val, size=size, teacher=teacher, teacher_acc=teacher_acc, teacher_fit_s=teacher_fit_s,
        student=student_base, method=method, fraction=fraction, rows=rows, seeds=seeds, extracted=extracted,
        cache_epoch_s=statistics.median(epoch_s), online_epoch_s=online_s, out=out,
    )


def _params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"


def print_table(*, data, val, size, teacher, teacher_acc, teacher_fit_s, student, method, fraction, rows, seeds, extracted, cache_epoch_s, online_epoch_s, out):
    from stages.distill import build_student

    student_model = build_student(student["student"], data.num_classes, 0, **student.get("student_kwargs", {}))
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731

    def spread(accs):
        return f"{pct(statistics.mean(accs))} ± {100 * statistics.stdev(accs):.1f}" if len(accs) > 1 else pct(accs[0])

    print()
    print(f"digits: {len(data):,} training / {len(val):,} validation images at {size} px; {len(seeds)} student seeds per row")
    print(f"teacher {teacher.spec.name} ({_params(teacher)} parameters); student {student['student']} ({_params(student_model)} parameters)")
    print()
    print(f"{'model':<34}{'labels used':>12}{'val top-1':>18}{'distilled wins':>16}")
    print(f"{'teacher ' + teacher.spec.name:<34}{'100%':>12}{pct(teacher_acc):>18}{'':>16}")
    for frac in dict.fromkeys([fraction, 1.0]):
        scratch, distilled = rows[(frac, "ce")], rows[(frac, method)]
        wins = sum(d > s for d, s in zip(distilled, scratch))
        tag = "  (control)" if frac == 1.0 and fraction != 1.0 else ""
        print(f"{'student from scratch' + tag:<34}{pct(frac):>12}{spread(scratch):>18}{'':>16}")
        print(f"{f'student distilled ({method}, cache)' + tag:<34}{pct(frac):>12}{spread(distilled):>18}{f'{wins} of {len(seeds)}':>16}")
    print()
    print(f"teacher fit: {teacher_fit_s:.0f} s; extraction: {extracted.views:,} views in {extracted.seconds:.1f} s ({extracted.views / extracted.seconds:,.0f} views/s)")
    print(f"distillation, seconds per epoch: from cache {cache_epoch_s:.2f}, teacher online {online_epoch_s:.2f} ({online_epoch_s / cache_epoch_s:.1f}x)")
    print()
    print(
        f"The teacher was trained on every label. In the {pct(fraction)} rows the student's cross-entropy sees the labels of "
        f"{pct(fraction)} of the training images, while the cached teacher outputs cover all of them."
    )
    print(f"Everything is under {out}: teacher/, store/, one directory per student run (metrics.jsonl, student.safetensors).")
