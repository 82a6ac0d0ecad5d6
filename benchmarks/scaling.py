"""Extraction throughput: in-process vs. Ray with 1 and 2 actors, on this machine.

Each round extracts the same plan into fresh temporary stores, once per setup,
round-robin, so machine noise hits all setups alike; medians are quoted. Ray runs
on a local instance started once (its start-up is not counted). Two rates per setup:

  wall    views / seconds of the whole call, actors' start-up (imports, building the
          teacher) included: what a short run sees.
  steady  views / seconds after the first unit came back: what a long run sees.

On CPU every Ray actor takes one core (Ray sets its torch threads to 1); the
in-process run uses torch's default threads. With ``--device cuda`` (a GPU
machine) the in-process teacher runs on the GPU and each actor holds one GPU
(``--gpus-per-worker 1``); without a GPU those rows print "needs a GPU".

With ``--teachers a,b,...`` it measures instead each teacher's own extraction
rate in this process, storage writes on (``--precision bf16`` for autocast),
and projects the hours that ImageNet-1k x 50 views would take on one such
device: the table to read before renting GPUs.

Run from the repository root (about 2-3 minutes on 2 CPU cores with the defaults):

    .venv/bin/python benchmarks/scaling.py
    .venv/bin/python benchmarks/scaling.py --device cuda --data 'fake:4096?size=224' --teacher resnet50 --size 224
    .venv/bin/python benchmarks/scaling.py --device cuda --precision bf16 --data 'fake:2048?size=256' --size 224 \
        --batch-size 256 --block 1024 --teachers beitv2_l,dinov2_l,resnet152
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cluster import ray_env  # noqa: E402
from pipeline.cluster.extract import extract_on_ray  # noqa: E402
from stages.cache import teacher_rows  # noqa: E402
from stages.data.datasets import open_dataset  # noqa: E402
from stages.teachers.extract import PRECISIONS, TeacherRunner, extract, teacher_info  # noqa: E402
from stages.teachers.extract_job import ExtractJob, prepare_extract  # noqa: E402
from stages.cache.store_setup import open_store  # noqa: E402
from stages.teachers.teachers import build_teacher  # noqa: E402
from stages.data.views import ViewPlan, ViewRecipe  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="fake:384?size=64", help="dataset (default: fake:384?size=64)")
    p.add_argument("--teacher", default="resnet18", help="timm model, random init (default: resnet18)")
    p.add_argument("--size", type=int, default=64, help="view size (default: 64)")
    p.add_argument("--views", type=int, default=2, help="views per sample (default: 2)")
    p.add_argument("--block", type=int, default=32, help="samples per unit (default: 32)")
    p.add_argument("--batch-size", type=int, default=32, help="teacher batch (default: 32)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (default: 3)")
    p.add_argument("--loader-workers", type=int, default=0, help="render processes with --teachers (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (default: cpu)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="teacher arithmetic (default: fp32)")
    p.add_argument(
        "--teachers", help="comma-separated teachers: measure each one's rate and project ImageNet x 50 views instead"
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU visible here")
    if args.teachers:
        return teacher_rates(args)

    dataset = open_dataset(args.data)
    teacher = build_teacher(args.teacher, random_init=True, num_classes=dataset.num_classes, input_size=args.size)
    info = teacher_info(teacher, teacher_rows.output_info(teacher), precision=args.precision)
    plan = ViewPlan(ViewRecipe(), 0)
    gpu = args.device.startswith("cuda")
    ray_env.connect(None)  # a local instance, started once
    tmp = Path(tempfile.mkdtemp(prefix="scaling-"))

    def fresh_store(name):
        return open_store(tmp / name, dataset, plan, views=args.views, block=args.block, size=args.size)

    def in_process(r):
        store = fresh_store(f"local-{r}")
        runner = TeacherRunner(teacher, info, args.device)
        res = extract(store, dataset, runner, "t", views=args.views, batch_size=args.batch_size)
        return res.views / res.seconds, res.views / res.seconds  # no start-up to separate

    def on_ray(actors):
        def go(r):
            # The same plan and outputs as fresh_store and info: the job's defaults.
            job = ExtractJob(
                store=str(tmp / f"ray{actors}-{r}"),
                data=args.data,
                teacher=args.teacher,
                views=args.views,
                teacher_id="t",
                random_init=True,
                size=args.size,
                block=args.block,
                precision=args.precision,
                batch_size=args.batch_size,
                device="cuda" if gpu else "cpu",
            )
            ready = prepare_extract(job, load=False)  # as the driver does: the teacher described, not loaded
            marks = []  # (time, views) as units come back
            with ready.open_store().lock_teacher("t"):
                res = extract_on_ray(
                    ready,
                    job,
                    actors=actors,
                    gpus_per_worker=1.0 if gpu else 0.0,
                    on_unit=lambda rows: marks.append((time.perf_counter(), rows)),
                )
            steady = sum(n for _, n in marks[1:]) / (marks[-1][0] - marks[0][0])
            return res.views / res.seconds, steady

        return go

    setups = {"in-process": in_process, "ray, 1 actor": on_ray(1), "ray, 2 actors": on_ray(2)}
    rates: dict[str, list[tuple[float, float]]] = {k: [] for k in setups}
    for r in range(args.repeats):
        for name, run in setups.items():
            rates[name].append(run(r))
            print(
                f"round {r + 1}: {name}: {rates[name][-1][0]:,.0f} views/s wall, {rates[name][-1][1]:,.0f} steady",
                file=sys.stderr,
            )

    total = len(dataset) * args.views
    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} torch threads in-process)"
    print(
        f"\nextraction of {args.teacher} at {args.size} px, {total:,} views in units of {args.block}, on {device}; "
        f"medians of {args.repeats} rounds\n"
    )
    print("| setup | views/s (wall) | views/s (steady) | steady vs. in-process |\n|---|---|---|---|")
    base = statistics.median(s for _, s in rates["in-process"])
    for name, got in rates.items():
        wall, steady = statistics.median(w for w, _ in got), statistics.median(s for _, s in got)
        print(f"| {name} ({args.device}) | {wall:,.0f} | {steady:,.0f} | {steady / base:.2f}x |")
    if not gpu:
        for name in ("in-process (cuda)", "ray, 1 actor (1 GPU)", "ray, 2 actors (1 GPU each)"):
            print(f"| {name} | needs a GPU (--device cuda) | | |")


IMAGENET_VIEWS = 1_281_167 * 50  # ImageNet-1k's training images, 50 views each


def teacher_rates(args) -> None:
    """Each teacher's extraction rate in this process (storage on), and the hours ImageNet x 50 views would take."""
    dataset = open_dataset(args.data)
    plan = ViewPlan(ViewRecipe(), 0)
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    )
    rows = []
    for name in args.teachers.split(","):
        teacher = build_teacher(name, random_init=True, num_classes=dataset.num_classes, input_size=args.size)
        info = teacher_info(teacher, teacher_rows.output_info(teacher), precision=args.precision)
        runner = TeacherRunner(teacher, info, args.device)
        rates = []
        with tempfile.TemporaryDirectory(prefix="rates-") as tmp:
            for r in range(args.repeats + 1):  # round 0 warms up (cuDNN autotuning, allocator): not counted
                store = open_store(
                    Path(tmp) / f"{r}", dataset, plan, views=args.views, block=args.block, size=args.size
                )
                res = extract(
                    store,
                    dataset,
                    runner,
                    "t",
                    views=args.views,
                    batch_size=args.batch_size,
                    workers=args.loader_workers,
                )
                if r:
                    rates.append(res.views / res.seconds)
                print(f"{name} round {r}: {res.views / res.seconds:,.1f} views/s", file=sys.stderr)
        rate = statistics.median(rates)
        rows.append((name, teacher.spec.timm_name, rate, IMAGENET_VIEWS / rate / 3600))
        del runner, teacher
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(
        f"\nextraction in one process on {device}, {args.precision}, {args.size} px, batch {args.batch_size}, storage writes on "
        f"(each teacher's default outputs: top-10 logits and/or pooled features, float16); medians of {args.repeats} rounds after one warm-up\n"
    )
    print(
        "| teacher | timm model | views/s per device | hours for ImageNet-1k x 50 views, one device |\n|---|---|---|---|"
    )
    for name, timm_name, rate, hours in rows:
        print(f"| {name} | {timm_name} | {rate:,.1f} | {hours:,.0f} |")


if __name__ == "__main__":
    main()
