"""Every claim the README makes for GPU users, measured by one script that prints one table.

1. extraction per GPU: each teacher's views/s with the store's writes on, against the bare forward on the same
   pre-rendered views (target >= 0.9x), and the hours ImageNet-1k x 10 views would take on one such device;
2. is the student waiting: the replay's rendering rate on this machine's CPU cores (A2 views of 500x375 JPEGs made
   here) against what each student consumes per second (bf16, channels_last): the CPU cores one GPU needs;
3. the cache's promise: an epoch distilling from the cache / the student alone with labels on the same views
   (target <= 1.05), and / the live teacher;
4. every GPU code path once, pass or fail: fp16 with the scaler, bf16, channels_last, --compile, --model-ema,
   a checkpoint resumed bit-identically, CosPress and GPD steps under autocast;
5. GPU JPEG decoding: torchvision.io.decode_jpeg(device="cuda") in batches against one CPU core's decode.

Synthetic data only, made on the spot. ``--device cpu --quick`` runs every step with tiny sizes in well under a
minute (a fast test does, so the script cannot rot between runs on a GPU); rows that need CUDA say so.

    .venv/bin/python benchmarks/gpu.py --device cpu --quick
    python benchmarks/gpu.py --device cuda            # on a GPU node (see benchmarks/README.md for the wheels to carry)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # loader.py's JPEG maker and replay epoch

IMAGENET_VIEWS = 1_281_167 * 10


@dataclasses.dataclass
class Sizes:
    teachers: tuple[str, ...]
    students: tuple[tuple[str, dict], ...]
    size: int
    images: int
    batch: int
    workers: int
    steps: int


FULL = Sizes(
    ("beitv2_l", "dinov2_l", "resnet152"),
    (("resnet18", {}), ("resnet50", {}), ("vit_tiny_patch16_224", {})),
    224,
    1024,
    256,
    max(1, (os.cpu_count() or 2) - 2),
    20,
)
QUICK = Sizes(
    ("resnet18",),
    (("resnet10t", {"channels": [8, 16, 32, 64]}), ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8})),
    32,
    64,
    16,
    0,
    2,
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, or cpu for the quick check (default: cuda)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every step in well under a minute on a CPU")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process on a CPU run (default: 1)")
    return p.parse_args()


def timed(fn, runs: int, sync) -> float:
    """Median seconds of ``fn`` over ``runs`` calls after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- 1. extraction --------------------------------------------------------------------------------


def extraction(sizes: Sizes, device: str, precision: str, tmp: Path, sync) -> tuple[list[tuple], tuple[Path, str]]:
    """Rows of section 1, and the store of the first teacher with logits (for sections 3 and 4)."""
    from stages.cache.store_setup import open_store
    from stages.cache.teacher_rows import output_info
    from stages.data.datasets import open_dataset
    from stages.data.views import ViewPlan, ViewRecipe, normalize
    from stages.teachers.extract import TeacherRunner, extract, teacher_info
    from stages.teachers.teachers import build_teacher

    data = open_dataset(f"fake:{sizes.images}?size={sizes.size}&classes=10")
    rows, first_store = [], None
    for name in sizes.teachers:
        teacher = build_teacher(name, random_init=True, num_classes=data.num_classes, input_size=sizes.size)
        runner = TeacherRunner(teacher, teacher_info(teacher, output_info(teacher), precision=precision), device)
        views = torch.randint(0, 256, (sizes.batch, 3, sizes.size, sizes.size), dtype=torch.uint8)

        def bare():
            with (
                torch.no_grad(),
                torch.autocast(torch.device(device).type, torch.bfloat16, enabled=precision == "bf16"),
            ):
                teacher(normalize(views.to(device), teacher.mean, teacher.std))

        bare_rate = sizes.batch / timed(bare, 3, sync)
        store = open_store(
            tmp / f"store-{name}", data, ViewPlan(ViewRecipe()), views=1, block=max(sizes.batch, 64), size=sizes.size
        )
        result = extract(store, data, runner, name, views=1, batch_size=sizes.batch, workers=sizes.workers)
        rate = result.views / result.seconds
        rows.append(
            (
                "1 extraction",
                f"{name} ({precision})",
                f"{rate:,.0f} views/s",
                f"bare forward {bare_rate:,.0f}",
                rate / bare_rate,
                ">= 0.9",
                f"IN-1k x 10 views: {IMAGENET_VIEWS / rate / 3600:,.1f} h",
            )
        )
        if first_store is None and teacher.num_classes:
            first_store = (store.path, name)
    return rows, first_store


# -- 2. is the student waiting? ---------------------------------------------------------------------


def student_rates(sizes: Sizes, device: str, tmp: Path, sync) -> list[tuple]:
    from loader import make_jpegs, replay_epoch

    from stages.data.views import ViewRecipe
    from stages.settings import build
    from pipeline.settings import config

    folder = make_jpegs(tmp / "jpegs", sizes.images, 10)
    recipe = build(ViewRecipe, config.recipe("vanillakd_a2")["views"], "configs/vanillakd_a2.yaml")
    workers = sizes.workers
    render, _ = replay_epoch(folder, recipe, sizes.size, sizes.batch, workers, seed=0)
    per_core = render / max(1, workers)
    rows = [
        (
            "2 student waits",
            f"A2 replay, {max(1, workers)} CPU process(es)",
            f"{render:,.0f} views/s",
            f"{per_core:,.0f} per core",
            None,
            "",
            "",
        )
    ]
    for name, kwargs in sizes.students:
        rate = _student_step_rate(name, kwargs, sizes, device, sync)
        rows.append(
            (
                "2 student waits",
                f"{name} step (bf16, channels_last)",
                f"{rate:,.0f} views/s",
                f"replay {render:,.0f}",
                render / rate,
                ">= 1",
                f"needs {rate / per_core:,.1f} CPU cores",
            )
        )
    return rows


def _student_step_rate(name: str, kwargs: dict, sizes: Sizes, device: str, sync) -> float:
    from stages.training.student import build_student

    model = build_student(name, 1000, 0, **kwargs).to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(sizes.batch, 3, sizes.size, sizes.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (sizes.batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return sizes.batch / timed(step, sizes.steps, sync)


# -- 3. the cache's promise, 4. the code paths ------------------------------------------------------


def _epoch(store: Path, device: str, sizes: Sizes, online: str | None = None, **train) -> dict:
    from stages.training.job import DistillJob, OnlineTeacher, build_distill
    from stages.training.settings import TrainSettings

    settings = TrainSettings(
        student=sizes.students[0][0],
        student_kwargs=dict(sizes.students[0][1]),
        epochs=1,
        batch_size=sizes.batch,
        workers=sizes.workers,
        verify="none",
        **train,
    )
    job = DistillJob(str(store), settings, online=OnlineTeacher(online, random_init=True) if online else None)
    return build_distill(job, device).train(device=device).metrics[-1]


def cache_promise(store: Path, teacher: str, sizes: Sizes, device: str) -> list[tuple]:
    amp = {"amp": "bf16", "channels_last": True} if device.startswith("cuda") else {}
    alone = _epoch(store, device, sizes, method="ce", **amp)["seconds"]
    cached = _epoch(store, device, sizes, method="kd", **amp)["seconds"]
    online = _epoch(store, device, sizes, online=teacher, method="kd", **amp)["seconds"]
    return [
        (
            "3 cache's promise",
            "epoch from the cache / student alone",
            f"{cached:.2f} s",
            f"alone {alone:.2f} s",
            cached / alone,
            "<= 1.05",
            "",
        ),
        (
            "3 cache's promise",
            "epoch with the live teacher / from the cache",
            f"{online:.2f} s",
            f"cache {cached:.2f} s",
            online / cached,
            "> 1",
            "",
        ),
    ]


def code_paths(store: Path, sizes: Sizes, device: str, tmp: Path) -> list[tuple]:
    cuda = device.startswith("cuda")
    checks = {
        "fp16 + gradient scaler": (dict(amp="fp16"), cuda),
        "bf16 autocast": (dict(amp="bf16"), True),
        "channels_last": (dict(channels_last=True), True),
        "torch.compile": (dict(compile=True), cuda),
        "model EMA": (dict(model_ema=0.99), True),
        "GPD step under autocast": (dict(method="gpd", amp="bf16"), True),
    }
    rows = []
    for what, (train, runs_here) in checks.items():
        rows.append(("4 code paths", what, *_outcome(lambda: _epoch(store, device, sizes, **train), runs_here)))
    rows.append(
        (
            "4 code paths",
            "checkpoint resumed bit-identically",
            *_outcome(lambda: _resume_is_exact(store, sizes, device, tmp), True),
        )
    )
    return rows


def _outcome(check, runs_here: bool) -> tuple:
    if not runs_here:
        return ("skipped", "needs CUDA", None, "", "")
    try:
        check()
    except Exception as e:  # the row says what broke; the table goes on
        return ("FAIL", f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}", None, "", "")
    return ("pass", "", None, "", "")


def _resume_is_exact(store: Path, sizes: Sizes, device: str, tmp: Path) -> None:
    """Two epochs in one go, against a run stopped after its first epoch's checkpoint and resumed from it."""
    from pipeline.runs.resume import checkpoint_hooks
    from stages.training.job import DistillJob, build_distill
    from stages.training.settings import TrainSettings

    settings = TrainSettings(
        student=sizes.students[0][0],
        student_kwargs=dict(sizes.students[0][1]),
        epochs=2,
        batch_size=sizes.batch,
        verify="none",
    )
    job = DistillJob(str(store), settings)
    whole = build_distill(job, device).train(device=device).model.state_dict()
    hooks = checkpoint_hooks(tmp / "r", job.run_record(), resume=False, start=lambda: None)
    save = hooks.save

    def save_then_stop(state, line):  # the kill after epoch 1, as tests/flows/test_resume.py does it
        save(state, line)
        raise KeyboardInterrupt

    hooks.save = save_then_stop
    try:
        build_distill(job, device).train(out_dir=tmp / "r", hooks=hooks, device=device)
    except KeyboardInterrupt:
        pass
    hooks = checkpoint_hooks(tmp / "r", job.run_record(), resume=True, start=lambda: None)
    resumed = build_distill(job, device).train(hooks=hooks, device=device).model.state_dict()
    if not all(torch.equal(whole[k], resumed[k]) for k in whole):
        raise AssertionError("resumed weights differ from the uninterrupted run's")


# -- 5. JPEG decoding -------------------------------------------------------------------------------


def jpeg_decoding(sizes: Sizes, device: str, tmp: Path, sync) -> list[tuple]:
    from torchvision.io import decode_jpeg, read_file

    files = sorted((tmp / "jpegs").rglob("*.jpg"))[: sizes.batch]
    data = [read_file(str(f)) for f in files]
    cpu = len(data) / timed(lambda: [decode_jpeg(d) for d in data], 3, lambda: None)
    if not device.startswith("cuda"):
        return [("5 JPEG decoding", "one CPU core", f"{cpu:,.0f} images/s", "", None, "", "GPU decoding needs CUDA")]
    gpu = len(data) / timed(lambda: decode_jpeg(data, device=device), 5, sync)
    return [
        (
            "5 JPEG decoding",
            f"decode_jpeg on {device}, batches of {len(data)}",
            f"{gpu:,.0f} images/s",
            f"one CPU core {cpu:,.0f}",
            gpu / cpu,
            "",
            "",
        )
    ]


# -- the table --------------------------------------------------------------------------------------


def print_table(rows: list[tuple], device: str) -> None:
    name = (
        torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} torch thread(s)"
    )
    print(f"\n{name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    header = ("section", "what", "measured", "against", "ratio", "target", "note")
    shown = [header] + [
        tuple("" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v) for v in row) for row in rows
    ]
    widths = [max(len(r[i]) for r in shown) for i in range(len(header))]
    for row in shown:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def main() -> int:
    args = parse_args()
    sizes = QUICK if args.quick else FULL
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "error: --device cuda but no CUDA GPU is visible: run on a GPU node, or pass --device cpu --quick",
            file=sys.stderr,
        )
        return 2
    if not device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    precision = "bf16" if device.startswith("cuda") else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows, (store, teacher) = extraction(sizes, device, precision, tmp, sync)
        rows += student_rates(sizes, device, tmp, sync)
        rows += cache_promise(store, teacher, sizes, device)
        rows += code_paths(store, sizes, device, tmp)
        rows += jpeg_decoding(sizes, device, tmp, sync)
    print_table(rows, device)
    return 1 if any(r[2] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
