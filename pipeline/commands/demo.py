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

import logging
import statistics
from pathlib import Path


from stages.data.datasets import open_dataset
from stages.settings import build
from stages.methods import list_methods
from stages.teachers.teachers import build_teacher
from stages.data.views import ViewRecipe


from pipeline.settings import config
from pipeline.commands.demo_steps import (
    cache_teachers,
    fitted_teacher,
    student_runs,
    teacher_name,
    time_epochs,
    variant,
)
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
    # each variant its own teacher and store
    out = Path(args.out or ("runs/demo" if args.method == "kd" else f"runs/demo-{args.method}"))
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
        tid: build_teacher(teacher_name(s), weights=str(out / tid / "model.safetensors"), input_size=size)
        for tid, s in demo.teachers.items()
    }
    store, extracted = cache_teachers(
        teachers, demo.outputs, data, recipe, cfg["cache"], size, out, demo.needs, args.workers
    )

    rows = _students(demo, store, seeds, fraction, out, args.method)

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


def _students(demo, store, seeds: list[int], fraction: float, out: Path, method: str) -> dict:
    """Step 3: every student (scratch and each distilled row, at ``fraction`` of the labels and the full-label
    control), trained side by side; their curves in students.png. Returns each run's final numbers."""
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
        title=f"digits: students from scratch and from the cache ({method})",
    )
    log.info("demo 3/4: curves of every student run -> %s", picture)
    return rows


def _params(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M"


def _rows(teachers, fits, names, fraction, rows, pct, spread) -> list[tuple]:
    """The table's rows: each teacher, then per label fraction the student from scratch and each distilled row."""
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
    return table


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
    table = _rows(teachers, fits, names, fraction, rows, pct, spread)
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
