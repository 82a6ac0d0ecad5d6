"""This product against timm's own knowledge distillation: epoch time on ImageNet-sized JPEGs, accuracy on digits.

One run, on one machine, side by side. The product is driven only through its command line
(``pipeline.cli.main`` in this process, so that each run pays no interpreter start-up); timm's side
is timm's ``LogitDistillationTask`` fed the way timm's ``train.py`` feeds it.

Speed, on one folder of 500x375 JPEGs (``loader.make_jpegs``, class-per-folder), the same teacher and
student architectures (random init), the same recipe (``configs/vanillakd_a2.yaml``: RandomResizedCrop, flip,
rand-m7-mstd0.5, mixup 0.1 / cutmix 1.0, LAMB, KD at T = 1 with a BCE hard loss, drop-path 0.05), the
same batch, threads and loader workers, one epoch per run:

  (a)  timm: ``create_transform(size, is_training=True, auto_augment="rand-m7-mstd0.5")`` on
       ``timm.data.ImageDataset(folder)``, a DataLoader, ``timm.data.Mixup(0.1, 1.0)`` on each batch,
       ``LogitDistillationTask(student, teacher)`` with the teacher online, timm's LAMB and cosine
       schedule, an optimiser step per batch.
  (b)  ``pipeline train --method ce``: the student alone, the floor.
  (c)  ``pipeline distill --online --teacher T``: the teacher run live on the replayed views.
  (d)  ``pipeline distill --from-cache STORE``: the teacher read from a store made once by
       ``pipeline extract`` (timed apart; its cost is also spread over 1, 3 and 10 runs).

The recipe's repeated augmentation (repeats 3) is turned off on both sides: timm's loader refuses
it outside distributed training. An epoch's time is the training loop only (no validation, models
built before): the ``seconds`` of the product's ``metrics.jsonl``, and the same span for (a), from
the loader's first batch to the last optimiser step. The teacher-to-student step cost ratio R is
measured in every round (teacher forward against student forward + backward on one batch, medians,
as ``distill_cost.py`` measures it). Rounds run (a) to (d) in turn, so machine noise hits all alike;
medians are quoted, and ratios are medians of per-round ratios. Targets: d/b <= 1.1, c/a <= 1.1,
a/d >= 0.9 R. The defaults (a resnet101 teacher, a quarter-width resnet18 student, 128 px) make R
about 5 on a 2-core CPU, where a full resnet18 student costs about as much as a resnet50 teacher.
Extraction is timed as its whole command but for imports (teacher built, views rendered, store written).
timm's transform resamples bilinearly (``create_transform``'s default); the product's RandAugment picks
bilinear or bicubic per op (its default, timm ``train.py``'s ``random``), a slightly dearer view.

Accuracy, on digits (``--data digits``: 1,433 train / 364 val at 32 px): a teacher fitted once by
``pipeline train``, then for each seed the same student trained by timm's ``LogitDistillationTask``
with that teacher online (loaded with ``timm.create_model("local-dir:DIR", pretrained=True)``) and by
``pipeline distill --from-cache`` (views extracted by ``pipeline extract``, one per epoch), with the
same settings and the demo's digits views (crop of 35-100 % of the area, no flip, no colour jitter).
Both students are evaluated here, on the same validation images with the same transform (timm's
centre crop at crop 1.0: the whole image). The two are called equal when their means differ by at
most the larger standard deviation.

Threads default to 1 (see ``distill_cost.py``: on a shared 2-core machine two threads can stall).
Run from the repository root (about 7 minutes on 2 CPU cores with the defaults; ``--quick``: about
a minute, tiny settings, for a smoke test):

    .venv/bin/python benchmarks/vs_timm_kd.py
    .venv/bin/python benchmarks/vs_timm_kd.py --quick
    .venv/bin/python benchmarks/vs_timm_kd.py --teacher resnet152 --size 160 --rounds 5 --seeds 5
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch
import yaml
from PIL import Image
from timm.data import ImageDataset, Mixup, create_transform
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import LogitDistillationTask

from distill_cost import median_seconds  # benchmarks/distill_cost.py: the same cost measurement
from loader import make_jpegs  # benchmarks/loader.py (run from the repository root as a script)
from pipeline.cli import main as pipeline_main
from stages.data.datasets import open_dataset, validation_data

RECIPE = "configs/vanillakd_a2.yaml"
DIGITS_VIEWS = ["--scale", "0.35", "1", "--hflip", "0", "--eval-crop", "1"]  # configs/demo.yaml's digits views
SPREAD = (1, 3, 10)  # runs over which one extraction's cost is spread


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny settings everywhere (over the size, model, round and seed flags), about a minute: a smoke test",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads on both sides (default: 1, see the docstring)")
    p.add_argument("--workers", type=int, default=1, help="loader processes on both sides (default: 1)")
    speed = p.add_argument_group("speed (JPEG folder, VanillaKD A2 views)")
    speed.add_argument("--images", type=int, default=256, help="JPEGs in the folder (default: 256)")
    speed.add_argument("--classes", type=int, default=10, help="class folders (default: 10)")
    speed.add_argument("--size", type=int, default=128, help="view size of teacher and student (default: 128)")
    speed.add_argument("--batch-size", type=int, default=32, help="views per step (default: 32)")
    speed.add_argument("--teacher", default="resnet101", help="timm teacher, random init (default: resnet101)")
    speed.add_argument("--student", default="resnet18", help="timm student (default: resnet18)")
    speed.add_argument(
        "--student-arg",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="timm.create_model argument of the student, YAML value (repeatable; default: channels=[16,32,64,128])",
    )
    speed.add_argument("--views", type=int, default=1, help="views extracted per image: one epoch's worth (default: 1)")
    speed.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a) to (d) (default: 3)")
    speed.add_argument(
        "--cost-runs", type=int, default=3, help="timed batches per round for the cost ratio (default: 3)"
    )
    acc = p.add_argument_group("accuracy (digits)")
    acc.add_argument(
        "--digits-teacher", default="resnet18", help="timm teacher fitted by pipeline train (default: resnet18)"
    )
    acc.add_argument("--digits-teacher-epochs", type=int, default=8, help="its epochs (default: 8)")
    acc.add_argument("--digits-student", default="resnet10t", help="timm student (default: resnet10t)")
    acc.add_argument(
        "--digits-student-arg",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="its timm.create_model argument (repeatable; default: channels=[8,16,32,64], the demo's)",
    )
    acc.add_argument(
        "--digits-epochs", type=int, default=6, help="student epochs; the store holds one view per epoch (default: 6)"
    )
    acc.add_argument("--digits-batch-size", type=int, default=128, help="(default: 128, the demo's)")
    acc.add_argument(
        "--digits-lr",
        type=float,
        default=0.004,
        help="AdamW peak rate, cosine to 0 per step (default: 0.004, the demo's)",
    )
    acc.add_argument("--temperature", type=float, default=4.0, help="KD temperature (default: 4, the demo's)")
    acc.add_argument("--seeds", type=int, default=3, help="student seeds per side (default: 3)")
    args = p.parse_args()
    if args.seeds < 2:
        p.error("--seeds must be at least 2: the comparison needs a standard deviation")
    if args.quick:
        args.images, args.size, args.batch_size, args.teacher, args.rounds, args.cost_runs = (
            48,
            64,
            16,
            "resnet50",
            1,
            1,
        )
        args.digits_teacher, args.digits_teacher_epochs, args.digits_epochs, args.seeds = "resnet10t", 1, 1, 2
    args.student_arg = args.student_arg or ["channels=[16,32,64,128]"]
    args.digits_student_arg = args.digits_student_arg or ["channels=[8,16,32,64]"]
    return args


def model_kwargs(pairs: list[str]) -> dict:
    """``KEY=VALUE`` pairs (YAML values) as timm.create_model arguments, as the product's --student-arg reads them."""
    return {key: yaml.safe_load(value) for key, value in (pair.split("=", 1) for pair in pairs)}


def run_pipeline(*argv) -> None:
    """``pipeline ARGV`` in this process; its console (warnings such as "no validation data", the result line) is shown only if it fails."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = pipeline_main(["--quiet", *map(str, argv)])
    if rc != 0:
        raise SystemExit(f"{out.getvalue()}pipeline {' '.join(map(str, argv))} exited {rc}")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def timm_epochs(task, loader, optimizer, scheduler, epochs: int, mixup=None) -> list[float]:
    """Seconds of each epoch's training loop, as the product's ``metrics.jsonl`` counts them: first batch to last step."""
    seconds, updates = [], 0
    for _ in range(epochs):
        task.train()
        start = time.perf_counter()
        for x, y in loader:
            if mixup is not None:
                x, y = mixup(x, y)
            loss = task(x, y)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            updates += 1
            scheduler.step_update(updates)
        seconds.append(time.perf_counter() - start)
    return seconds


def timm_schedule(optimizer, epochs: int, warmup_epochs: float, steps: int):
    # Per step, as train.py with --sched-on-updates and as the product's cosine; decays to 0 as the product's does.
    return create_scheduler_v2(
        optimizer,
        "cosine",
        num_epochs=epochs,
        warmup_epochs=warmup_epochs,
        min_lr=0.0,
        step_on_epochs=False,
        updates_per_epoch=steps,
    )[0]


def batches(dataset, batch_size: int, workers: int, seed: int):
    """timm's training DataLoader as ``loader.timm_epoch`` builds it: shuffled, last partial batch dropped."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if workers else None,
    )


# -- speed -------------------------------------------------------------------------------------


def cost_ratio(teacher, student, args) -> float:
    """Teacher forward over student forward + backward on one batch (medians), as ``distill_cost.py`` measures it."""
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    labels = torch.arange(args.batch_size) % args.classes

    def student_step():
        student.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(student(x), labels).backward()

    def teacher_forward():
        with torch.no_grad():
            teacher(x)

    student.train()
    return median_seconds(teacher_forward, args.cost_runs) / median_seconds(student_step, args.cost_runs)


def timm_kd_epoch(folder: Path, recipe: dict, args, seed: int) -> float:
    """(a): one epoch of timm's LogitDistillationTask, teacher online, fed as train.py feeds it."""
    views, kd = recipe["views"], recipe["method_args"]
    torch.manual_seed(seed)
    student = timm.create_model(
        args.student, num_classes=args.classes, drop_path_rate=recipe["drop_path"], **model_kwargs(args.student_arg)
    )
    teacher = timm.create_model(args.teacher, num_classes=args.classes)
    task = LogitDistillationTask(
        student,
        teacher,
        criterion_kwargs={"loss_type": kd["hard_loss"], "soft_targets": True},
        distill_loss_weight=kd["kd_weight"],
        task_loss_weight=kd["ce_weight"],
        temperature=kd["temperature"],
        verbose=False,
    )
    transform = create_transform(
        args.size,
        is_training=True,
        scale=tuple(views["scale"]),
        hflip=views["hflip"],
        auto_augment=views["randaugment"],
    )
    loader = batches(ImageDataset(str(folder), transform=transform), args.batch_size, args.workers, seed)
    # timm's Mixup smooths labels by 0.1 unless told otherwise; the recipe has no smoothing.
    mixup = Mixup(
        mixup_alpha=views["mixup_alpha"],
        cutmix_alpha=views["cutmix_alpha"],
        label_smoothing=recipe["label_smoothing"],
        num_classes=args.classes,
    )
    optimizer = create_optimizer_v2(student, recipe["optimizer"], lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    scheduler = timm_schedule(optimizer, 1, recipe["warmup_epochs"], len(loader))
    return timm_epochs(task, loader, optimizer, scheduler, 1, mixup)[0]


def speed(args, tmp: Path) -> None:
    folder = make_jpegs(tmp / "jpegs", args.images, args.classes)
    recipe = yaml.safe_load(Path(RECIPE).read_text())
    student_flags = [f for pair in args.student_arg for f in ("--student-arg", pair)]
    common = [
        "--config",
        RECIPE,
        "--epochs",
        1,
        "--batch-size",
        args.batch_size,
        "--repeats",
        1,
        "--workers",
        args.workers,
        "--threads",
        args.threads,
    ]
    store = tmp / "store"
    print(
        f"\n## Speed: {args.images} JPEGs 500x375 in {args.classes} folders, views {args.size} px, batch {args.batch_size}, "
        f"teacher {args.teacher} (random init), student {args.student} {' '.join(args.student_arg)}, {RECIPE} views "
        f"(repeats 1), {args.workers} loader worker(s), {args.rounds} round(s)\n",
        flush=True,
    )

    start = time.perf_counter()
    run_pipeline(
        "extract",
        "--data",
        f"folder:{folder}",
        "--teacher",
        args.teacher,
        "--random-init",
        "--views",
        args.views,
        "--config",
        RECIPE,
        "--size",
        args.size,
        "--batch-size",
        args.batch_size,
        "--workers",
        args.workers,
        "--threads",
        args.threads,
        "--store",
        store,
    )
    # the whole command but for imports: teacher built, views rendered, store written
    extract_s = time.perf_counter() - start
    print(f"extract: {args.views} view(s) x {args.images} images in {extract_s:.1f} s", flush=True)

    runs = {
        "b": (
            "train",
            "--data",
            f"folder:{folder}",
            "--model",
            args.student,
            *[f.replace("--student-arg", "--model-arg") for f in student_flags],
            "--method",
            "ce",
            "--size",
            args.size,
            *common,
        ),
        "c": (
            "distill",
            "--from-cache",
            store,
            "--online",
            "--teacher",
            args.teacher,
            "--random-init",
            "--student",
            args.student,
            *student_flags,
            "--method",
            "kd",
            *common,
        ),
        "d": ("distill", "--from-cache", store, "--student", args.student, *student_flags, "--method", "kd", *common),
    }
    teacher = timm.create_model(args.teacher, num_classes=args.classes).eval()
    student = timm.create_model(args.student, num_classes=args.classes, **model_kwargs(args.student_arg))
    seconds = {k: [] for k in "abcd"}
    ratios = []
    for r in range(args.rounds):
        ratios.append(cost_ratio(teacher, student, args))
        seconds["a"].append(timm_kd_epoch(folder, recipe, args, seed=r))
        for name, argv in runs.items():
            out = tmp / f"{name}{r}"
            run_pipeline(*argv, "--seed", r, "--out", out)
            seconds[name].append(metrics(out)[0]["seconds"])
        print(
            f"  round {r + 1}/{args.rounds}: R {ratios[-1]:.1f}, "
            + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()),
            flush=True,
        )

    views_per_epoch = args.images // args.batch_size * args.batch_size  # every run drops its last partial batch
    med = {k: statistics.median(v) for k, v in seconds.items()}

    def vs_a(name: str) -> float:  # epoch seconds over (a)'s, per round (adjacent in time), median
        return statistics.median([x / a for x, a in zip(seconds[name], seconds["a"])])

    rows = [
        ("(a) timm LogitDistillationTask, teacher online", med["a"], 1.0),
        ("(b) pipeline train, student alone (ce)", med["b"], vs_a("b")),
        ("(c) pipeline distill --online", med["c"], vs_a("c")),
        ("(d) pipeline distill --from-cache", med["d"], vs_a("d")),
    ] + [
        (f"(d) + extraction / {n} run{'s' * (n > 1)}", med["d"] + extract_s / n, (med["d"] + extract_s / n) / med["a"])
        for n in SPREAD
    ]
    print("\n| run | epoch s | epoch / (a) | views/s | views/s / (a) |\n|---|---|---|---|---|")
    for name, s, ratio in rows:
        print(f"| {name} | {s:.2f} | {ratio:.2f}x | {views_per_epoch / s:.1f} | {1 / ratio:.2f}x |")

    R = statistics.median(ratios)
    d_b = statistics.median([d / b for d, b in zip(seconds["d"], seconds["b"])])
    c_a, a_d = vs_a("c"), 1 / vs_a("d")
    print(
        f"\nteacher-to-student step cost ratio R = {R:.2f} (teacher {args.teacher} forward / student forward+backward, batch {args.batch_size}; "
        f"per round {', '.join(f'{x:.2f}' for x in ratios)}); extraction {extract_s:.1f} s = {extract_s / med['a']:.2f} timm epochs"
    )
    print("\n| target | measured | |\n|---|---|---|")
    for text, value, bound, met in (
        ("d/b <= 1.1 (cache vs. student alone)", d_b, "", d_b <= 1.1),
        ("c/a <= 1.1 (online vs. timm online)", c_a, "", c_a <= 1.1),
        (
            f"a/d >= 0.9 R = {0.9 * R:.2f} (cache speed-up vs. timm online)",
            a_d,
            f" (1 + R = {1 + R:.2f} if the loader cost nothing)",
            a_d >= 0.9 * R,
        ),
    ):
        print(f"| {text} | {value:.2f}{bound} | {'met' if met else 'NOT met'} |")


# -- accuracy on digits ------------------------------------------------------------------------


class Digits(torch.utils.data.Dataset):
    """The product's digits split (its ``open_dataset`` / ``validation_data``) as PIL images through a timm transform."""

    def __init__(self, split: str, transform):
        data = open_dataset("digits") if split == "train" else validation_data("digits", None)
        self.images = [Image.fromarray(data.image(i).permute(1, 2, 0).numpy()) for i in range(len(data))]
        self.labels = [int(y) for y in data.labels]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.labels[i]


@torch.no_grad()
def top1(model, val: Digits) -> float:
    model.eval()
    correct = 0
    for x, y in torch.utils.data.DataLoader(val, batch_size=256):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(val)


def timm_digits_student(args, teacher_dir: Path, seed: int) -> tuple[torch.nn.Module, float]:
    """The student distilled by timm's LogitDistillationTask, teacher online: (student, median epoch seconds)."""
    torch.manual_seed(seed)
    student = timm.create_model(args.digits_student, num_classes=10, **model_kwargs(args.digits_student_arg))
    teacher = timm.create_model(f"local-dir:{teacher_dir}", pretrained=True)
    task = LogitDistillationTask(
        student, teacher, criterion=torch.nn.CrossEntropyLoss(), temperature=args.temperature, verbose=False
    )
    cfg = student.pretrained_cfg
    # The product's digits views: crop of 35-100 % of the area, bilinear, no flip; no colour jitter (timm's default adds it).
    transform = create_transform(
        32, is_training=True, scale=(0.35, 1.0), hflip=0.0, color_jitter=None, mean=cfg["mean"], std=cfg["std"]
    )
    loader = batches(Digits("train", transform), args.digits_batch_size, args.workers, seed)
    # the product's default decay
    optimizer = create_optimizer_v2(student, "adamw", lr=args.digits_lr, weight_decay=0.05)
    seconds = timm_epochs(
        task, loader, optimizer, timm_schedule(optimizer, args.digits_epochs, 0, len(loader)), args.digits_epochs
    )
    return student, statistics.median(seconds)


def accuracy(args, tmp: Path) -> None:
    student_flags = [f for pair in args.digits_student_arg for f in ("--student-arg", pair)]
    print(
        f"\n## Accuracy on digits: teacher {args.digits_teacher} ({args.digits_teacher_epochs} epochs), student {args.digits_student} "
        f"{' '.join(args.digits_student_arg)}, KD T = {args.temperature}, {args.digits_epochs} epochs, batch {args.digits_batch_size}, "
        f"AdamW {args.digits_lr} cosine, {args.seeds} seeds\n",
        flush=True,
    )
    teacher_dir, store = tmp / "digits-teacher", tmp / "digits-store"
    # The demo's teacher: rate 0.002, its digits views.
    run_pipeline(
        "train",
        "--data",
        "digits",
        "--model",
        args.digits_teacher,
        "--epochs",
        args.digits_teacher_epochs,
        "--size",
        32,
        "--lr",
        0.002,
        *DIGITS_VIEWS,
        "--workers",
        args.workers,
        "--threads",
        args.threads,
        "--out",
        teacher_dir,
    )
    run_pipeline(
        "extract",
        "--data",
        "digits",
        "--teacher",
        args.digits_teacher,
        "--weights",
        teacher_dir / "model.safetensors",
        "--views",
        args.digits_epochs,
        *DIGITS_VIEWS,
        "--workers",
        args.workers,
        "--threads",
        args.threads,
        "--store",
        store,
    )
    val = Digits(
        "val",
        create_transform(32, is_training=False, crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    )
    print(
        f"teacher val top-1 {top1(timm.create_model(f'local-dir:{teacher_dir}', pretrained=True), val):.4f}", flush=True
    )

    results = {"timm": [], "cache": []}
    seconds = {"timm": [], "cache": []}
    own = []  # the product's own val_top1, a check that both evaluations agree
    for seed in range(args.seeds):
        student, s = timm_digits_student(args, teacher_dir, seed)
        results["timm"].append(top1(student, val))
        seconds["timm"].append(s)
        out = tmp / f"digits-cache{seed}"
        run_pipeline(
            "distill",
            "--from-cache",
            store,
            "--student",
            args.digits_student,
            *student_flags,
            "--method",
            "kd",
            "--method-arg",
            f"temperature={args.temperature}",
            "--epochs",
            args.digits_epochs,
            "--batch-size",
            args.digits_batch_size,
            "--lr",
            args.digits_lr,
            "--seed",
            seed,
            "--workers",
            args.workers,
            "--threads",
            args.threads,
            "--out",
            out,
        )
        results["cache"].append(top1(timm.create_model(f"local-dir:{out}", pretrained=True), val))
        seconds["cache"].append(statistics.median(m["seconds"] for m in metrics(out)))
        own.append(metrics(out)[-1]["val_top1"])
        print(
            f"  seed {seed}: timm {results['timm'][-1]:.4f}, cache {results['cache'][-1]:.4f} (its own val_top1 {own[-1]:.4f})",
            flush=True,
        )

    names = {"timm": "timm LogitDistillationTask, teacher online", "cache": "pipeline distill --from-cache"}
    print("\n| side | val top-1 per seed | mean | std | epoch s |\n|---|---|---|---|---|")
    for side, accs in results.items():
        print(
            f"| {names[side]} | {', '.join(f'{a:.4f}' for a in accs)} | {statistics.mean(accs):.4f} | {statistics.stdev(accs):.4f} | {statistics.median(seconds[side]):.2f} |"
        )
    gap = abs(statistics.mean(results["timm"]) - statistics.mean(results["cache"]))
    spread = max(statistics.stdev(a) for a in results.values())
    print(
        f"\nmeans differ by {gap:.4f}, the larger std is {spread:.4f}: equal within one standard deviation: {'yes' if gap <= spread else 'NO'}"
    )
    if max(abs(a - b) for a, b in zip(results["cache"], own)) > 1e-9:
        print(f"note: the product's own val_top1 ({', '.join(f'{a:.4f}' for a in own)}) differs from this evaluation")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"# vs_timm_kd: python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, "
        f"cpus {cpus} (os.cpu_count {os.cpu_count()}), load average {os.getloadavg()[0]:.2f}{', --quick' if args.quick else ''}",
        flush=True,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vs_timm_kd_") as tmp:
        speed(args, Path(tmp))
        accuracy(args, Path(tmp))
    print(f"\nwall {time.perf_counter() - start:.0f} s, load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
