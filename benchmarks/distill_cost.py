"""What distilling from the cache costs the student, next to training alone and distilling online.

One run, on one machine, side by side:

  cost    teacher forward vs. student forward+backward on one batch (medians), so the
          reader sees the pair is what it claims (the default pair is about 10x).
  extract the teacher (random init) over the stored views, once, into a temporary store
          with top-k float16 logits (the product default), reporting views/s.
  (a)     ``train`` with method ``ce`` and no teacher, on the same StoredViews (same loader,
          same rendering, same replay checks): the floor.
  (b)     method ``kd`` with ``CachedTeacher``: teacher outputs read from the store.
  (c)     method ``kd`` with ``LiveTeacher``: the teacher run on the same replayed views
          (``--no-online`` leaves it out).
  (d)     with ``--method NAME``: that method from the same cache, e.g. ``gpd``, whose dynamic
          teacher (the student widened r = 2 times) costs about r^2 of the student per step;
          d/b is its step-time ratio against KD. The store then also holds what the method
          reads (CosPress: the teacher's tokens, so pass a timm ViT teacher with a classifier
          and a student whose token grid matches, through ``--student-arg``). ``--method-arg``
          passes it settings.
  (e)     with ``--compare-arg KEY=VALUE``: the method of (d) again, with these settings on top,
          e.g. ``--compare-arg orepa=true``: GPD with OREPA branches against GPD without; e/d
          is the step-time ratio.

(a) to (e) run round-robin, ``--repeats`` times, so machine noise hits them all alike.
An epoch's time is the ``seconds`` field of its metrics (training only, no validation), a step's
that divided by the epoch's steps;
with more than one epoch per run the first is dropped as warm-up. Medians are quoted,
since machines here are shared and noisy. The target: b/a <= 1.05. ``--device cuda --amp bf16``
runs every run's step (and the cost ratio) on the GPU under autocast, as ``distill --amp`` does.
b/a per round (a and b adjacent in time) is printed too: a burst of load shows up there.

Threads default to 1: on a shared 2-core machine a neighbour's load slows a one-thread run
at most about 2x, while with 2 threads OpenMP's barriers can stall it 5-10x, at random.
On a quiet machine, pass ``--threads 2``.

Run from the repository root (about 3-5 minutes on 2 CPU cores with the defaults):

    .venv/bin/python benchmarks/distill_cost.py
    .venv/bin/python benchmarks/distill_cost.py --threads 2 --data 'fake:1024?size=32&classes=100'
    .venv/bin/python benchmarks/distill_cost.py --method gpd --no-online --teacher resnet34 --student resnet18
    .venv/bin/python benchmarks/distill_cost.py --method gpd --compare-arg orepa=true --no-online --teacher resnet34 --student resnet18
    .venv/bin/python benchmarks/distill_cost.py --method cospress --no-online --size 224 --teacher vit_small_patch14_dinov2 \
        --student vit_tiny_patch16_224 --student-arg patch_size=14 --data 'fake:128?size=224&classes=100' --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

from pipeline.settings.config import parse_pairs
from stages.cache import teacher_rows
from stages.data.datasets import open_dataset
from stages.training.distill import train
from stages.training.settings import TrainSettings
from stages.methods import method_class
from stages.model_outputs import student_forward
from stages.training.student import build_student
from stages.teachers.teacher_sources import CachedTeacher, LiveTeacher
from stages.teachers.extract import TeacherRunner, extract, teacher_info
from stages.cache.store_setup import open_store, stored_plan
from stages.data.replay import StoredViews
from stages.teachers.teachers import build_teacher
from stages.training.precision import Precision
from stages.data.views import ViewPlan, ViewRecipe, normalize


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fake:256?size=32&classes=100", help="dataset (stages.datasets.open_dataset)")
    p.add_argument("--teacher", default="regnety_320", help="teacher: timm name or registered short name")
    p.add_argument("--student", default="resnet10t", help="student: timm name")
    p.add_argument(
        "--student-arg",
        action="append",
        metavar="KEY=VALUE",
        help="timm.create_model argument of the student (repeatable)",
    )
    p.add_argument("--size", type=int, default=32, help="input size of teacher and student views")
    p.add_argument("--views", type=int, default=1, help="stored views per sample")
    p.add_argument("--block", type=int, default=128, help="samples per store unit")
    p.add_argument("--topk", type=int, default=10, help="top-k logits stored (float16)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the first is dropped when > 1")
    p.add_argument("--repeats", type=int, default=5, help="round-robin rounds of (a, b, c)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0, help="loader processes rendering views")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: see the docstring)")
    p.add_argument("--cost-runs", type=int, default=5, help="timed batches for the cost ratio")
    p.add_argument("--device", default="cpu", help="where student and live teacher run: cpu, cuda")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast of every run's step (and of the cost ratio)")
    p.add_argument("--method", help="also time this method from the same cache, as run (d), e.g. gpd")
    p.add_argument(
        "--method-arg", action="append", metavar="KEY=VALUE", help="a setting of the method of (d) (repeatable)"
    )
    p.add_argument(
        "--compare-arg",
        action="append",
        metavar="KEY=VALUE",
        help="also time (d)'s method with this setting on top, as run (e), e.g. orepa=true (repeatable)",
    )
    p.add_argument("--no-online", action="store_true", help="leave out run (c), the live teacher")
    return p.parse_args()


def median_seconds(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cost_ratio(teacher, args, num_classes: int) -> tuple[float, float]:
    """Median seconds of one teacher forward and one student forward+backward on a batch."""
    x = torch.randint(0, 256, (args.batch_size, 3, args.size, args.size), dtype=torch.uint8, device=args.device)
    labels = torch.arange(args.batch_size, device=args.device) % num_classes
    student = build_student(args.student, num_classes, seed=0, **args.student_kwargs).train().to(args.device)
    autocast = Precision(args.amp, args.device).autocast
    xs = normalize(x, student.pretrained_cfg["mean"], student.pretrained_cfg["std"])
    xt = normalize(x, teacher.mean, teacher.std)

    def student_step():
        student.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(student_forward(student, xs, ())["logits"], labels)
        loss.backward()
        synchronize(args.device)

    def teacher_forward():
        with torch.no_grad(), autocast():
            teacher(xt)
        synchronize(args.device)

    t_s = median_seconds(student_step, args.cost_runs)
    t_t = median_seconds(teacher_forward, args.cost_runs)
    return t_t, t_s


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main():
    args = parse_args()
    args.student_kwargs = parse_pairs(args.student_arg, "--student-arg")
    args.method_kwargs = parse_pairs(args.method_arg, "--method-arg")
    args.compare_kwargs = parse_pairs(args.compare_arg, "--compare-arg")
    if args.compare_kwargs and not args.method:
        raise SystemExit("--compare-arg compares two settings of --method: pass --method too")
    torch.set_num_threads(args.threads)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"environment: python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, "
        f"threads {torch.get_num_threads()}, cpus {cpus} (os.cpu_count {os.cpu_count()}), "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    data = open_dataset(args.data)
    C = data.num_classes
    print(
        f"setup: data {args.data} ({len(data)} samples, {C} classes), size {args.size}, batch {args.batch_size}, "
        f"views {args.views}, block {args.block}, epochs/run {args.epochs}, repeats {args.repeats}, workers {args.workers}"
    )
    teacher = build_teacher(args.teacher, random_init=True, num_classes=C, input_size=args.size).to(args.device)

    t_t, t_s = cost_ratio(teacher, args, C)
    print(
        f"cost: teacher {args.teacher} forward {t_t * 1e3:.1f} ms, student {args.student} forward+backward "
        f"{t_s * 1e3:.1f} ms per batch of {args.batch_size} (medians of {args.cost_runs}): ratio {t_t / t_s:.1f}x"
    )

    with tempfile.TemporaryDirectory(prefix="distill_cost_") as tmp:
        plan = ViewPlan(ViewRecipe(), seed=0)
        store = open_store(Path(tmp) / "store", data, plan, views=args.views, block=args.block, size=args.size)
        needs = method_class(args.method).needs if args.method else ()
        outputs = tuple(dict.fromkeys(("logits", *needs)))  # what (b) and (d) read
        info = teacher_info(
            teacher, teacher_rows.output_info(teacher, logits="topk", k=args.topk, dtype="float16", outputs=outputs)
        )
        r = extract(
            store,
            data,
            TeacherRunner(teacher, info, args.device),
            "t",
            views=args.views,
            batch_size=args.batch_size,
            workers=args.workers,
        )
        print(
            f"extract: {r.views} views ({', '.join(outputs)}; top-{info.k} float16) in {r.seconds:.1f} s = {r.views / r.seconds:.0f} views/s"
        )

        views = StoredViews(store, stored_plan(store))
        runs = {
            "(a) student + labels": ("ce", None, {}),
            "(b) distill from cache": ("kd", CachedTeacher(store, "t", ("logits",)), {}),
            "(c) distill online": ("kd", LiveTeacher(teacher, ("logits",)), {}),
        }
        if args.no_online:
            del runs["(c) distill online"]
        if args.method:
            cached = CachedTeacher(store, "t", method_class(args.method).needs)
            runs[f"(d) {args.method} from cache"] = (args.method, cached, args.method_kwargs)
            if args.compare_kwargs:
                extra = ",".join(f"{k}={v}" for k, v in args.compare_kwargs.items())
                runs[f"(e) {args.method} {extra}"] = (
                    args.method,
                    cached,
                    {**args.method_kwargs, **args.compare_kwargs},
                )
        seconds = {name: [] for name in runs}
        rates = {name: [] for name in runs}
        for rep in range(args.repeats):
            for name, (method, source, method_args) in runs.items():
                settings = TrainSettings(
                    student=args.student,
                    student_kwargs=args.student_kwargs,
                    method=method,
                    method_args=method_args,
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    amp=args.amp,
                )
                metrics = train(settings, data, None, views, views.plan, source, device=args.device).metrics
                kept = metrics[1:] if len(metrics) > 1 else metrics
                seconds[name] += [m["seconds"] for m in kept]
                rates[name] += [m["views_per_s"] for m in kept]
            print(
                f"  round {rep + 1}/{args.repeats}: " + ", ".join(f"{n[:3]} {seconds[n][-1]:.2f} s" for n in runs),
                flush=True,
            )

    med = {n: statistics.median(s) for n, s in seconds.items()}
    print(f"\nepoch seconds, {len(seconds[next(iter(runs))])} epochs per run kind, interleaved:")
    print(f"{'run':26s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'views/s':>8s} {'ms/step':>8s}")
    for n in runs:
        rate = statistics.median(rates[n])  # views per second: a step is batch-size views
        print(
            f"{n:26s} {med[n]:9.2f} {min(seconds[n]):7.2f} {max(seconds[n]):7.2f} {rate:8.0f} {1e3 * args.batch_size / rate:8.1f}"
        )
    names = list(runs)
    b_a = med[names[1]] / med[names[0]]
    paired = " ".join(f"{b / a:.2f}" for a, b in zip(seconds[names[0]], seconds[names[1]]))
    print(f"\nb/a = {b_a:.3f}   (cache vs. student alone; target <= 1.05: {'PASS' if b_a <= 1.05 else 'FAIL'})")
    print(f"      per round (adjacent in time): {paired}")
    if "(c) distill online" in runs:
        print(
            f"c/b = {med['(c) distill online'] / med[names[1]]:.2f}    (online teacher vs. cache; teacher/student cost ratio {t_t / t_s:.1f}x)"
        )
    if args.method:
        d = next(n for n in names if n.startswith("(d)"))
        paired_d = " ".join(f"{x / b:.2f}" for b, x in zip(seconds[names[1]], seconds[d]))
        print(
            f"d/b = {med[d] / med[names[1]]:.2f}    ({args.method} vs. kd, both from the cache; per round: {paired_d})"
        )
    if args.compare_kwargs:
        e = names[-1]
        paired_e = " ".join(f"{y / x:.2f}" for x, y in zip(seconds[d], seconds[e]))
        print(f"e/d = {med[e] / med[d]:.2f}    ({e[4:]} vs. without, per step; per round: {paired_e})")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
