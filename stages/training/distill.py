"""Stage two: train a student on replayed views, with the teacher read from the cache or run live.

One loop serves three uses: distillation from a store (``CachedTeacher``),
distillation with the teacher run on the same replayed views
(``LiveTeacher``), and plain supervised training (no teacher, method ``ce``).
An epoch reads, for each block of samples, one whole stored unit of some view
(cycling through the views), shuffles rows within a window of blocks in
memory, and renders the batch's images in loader workers.

Under ``torch.distributed`` (DDP) each rank trains on its own share of every
epoch's units and metrics are reduced over ranks; ``EpochHooks`` save and
restore the whole training state once per epoch. With one process and no
hooks the loop is exactly the single-process one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from storage import UserError

from ..data.datasets import ImageDataset
from ..methods import Method, build_method, needs_teacher
from .precision import Precision
from ..progress import Progress
from .run_metrics import RunMetrics
from .settings import TrainSettings
from ..data.replay import StoredViews, ViewRenderer, even_batches, render_batches
from .loader import Batch, ReplayLoader, epoch_note, rank_and_world, steps_per_epoch
from .student import StudentCard, build_student, save_student, trained_on
from ..teachers.teacher_sources import TeacherSource
from ..data.views import EVAL_FIELDS, ViewPlan, eval_params, normalize

log = logging.getLogger(__name__)


@torch.no_grad()
def evaluate(
    model, dataset: ImageDataset, plan: ViewPlan, size: int, mean, std, workers=0, batch_size=256, device="cpu",
    precision: Precision | None = None, channels_last: bool = False,
) -> float:
    """Top-1 accuracy on deterministic centre-crop views; under DDP each rank scores every world-th sample."""
    model.eval()
    rank, world = rank_and_world()
    ids = np.arange(len(dataset))[rank::world]
    table = {"id": ids, "label": dataset.labels[ids], **eval_params(dataset.sizes()[ids], plan.recipe.eval_crop, plan.recipe.eval_interpolation)}
    renderer = ViewRenderer(dataset, plan, (size,))
    correct = 0
    for batch, rendered in render_batches(renderer, even_batches(table, batch_size), list(EVAL_FIELDS), workers):
        with precision.autocast() if precision else contextlib.nullcontext():
            logits = model(to_input(rendered["views"][0], mean, std, device, channels_last))
        correct += int((logits.argmax(1).cpu().numpy() == batch["label"]).sum())
    if world > 1:
        correct = int(_all_sum([correct], device)[0])
    return correct / len(dataset)


def to_input(views: torch.Tensor, mean, std, device, channels_last: bool = False) -> torch.Tensor:
    """uint8 views -> the model's normalised input on ``device``: a quarter of float32's bytes cross the bus."""
    if torch.device(device).type == "cuda" and views.device.type == "cpu":
        views = views.pin_memory()
    x = normalize(views.to(device, non_blocking=True), mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


TEACHER = "teacher"  # the run's teacher source in its loader's ``teachers``


def teacher_outputs(teacher: TeacherSource | None, batch: Batch, temperature) -> dict[str, torch.Tensor]:
    """The teacher's outputs for a batch already on the student's device, as float32 (a live teacher under autocast gives bf16/fp16).

    A cached teacher's came with the batch (the loader decoded them at the method's ``temperature``); a live one runs here."""
    if teacher is None:
        return {}
    if teacher.size is None:
        return batch.teachers[TEACHER]
    return {k: v.float() for k, v in teacher.outputs(batch.rows, batch.teacher_images, temperature).items()}


def step(run: Setup, loss: torch.Tensor, clip_grad: float | None) -> None:
    """Backward, optional clipping, optimiser and schedule step, EMA update; through the fp16 scaler when it is on."""
    scaler = run.precision.scaler
    run.optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad is not None:
        scaler.unscale_(run.optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_([p for g in run.optimizer.param_groups for p in g["params"]], clip_grad)
    scaler.step(run.optimizer)
    scaler.update()
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update(run.model)


EMA_FOLDER = "ema"  # OUT/ema/: the EMA student as a timm model folder of its own (model.safetensors, config.json)


def _model_ema(model: nn.Module, decay: float | None) -> nn.Module | None:
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def _compiled(model: nn.Module) -> nn.Module:
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise UserError(f"--compile: torch.compile is not supported here (torch {torch.__version__}): drop --compile")
    return torch.compile(model)


# -- several processes (DDP) -----------------------------------------------------------------


def _all_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def resolve_batch(batch_size: int | None, global_batch: int | None, world: int, where: str = "the recipe") -> tuple[int, int]:
    """(per-worker batch, global batch) for ``world`` workers (1: a single process takes the whole global batch).

    ``batch_size`` (per worker, as timm's --batch-size) wins when given; else
    ``global_batch`` (a paper's batch over all its GPUs, as a recipe states it) is
    split over the workers, which must divide it.
    """
    world = max(1, world)
    if batch_size is not None:
        return batch_size, batch_size * world
    if global_batch is None:
        batch_size = TrainSettings.batch_size
        return batch_size, batch_size * world
    if global_batch % world:
        raise UserError(
            f"global_batch {global_batch} in {where} does not divide over {world} workers: choose a number of workers that divides it, "
            f"or pass --batch-size B for B per worker"
        )
    return global_batch // world, global_batch


@dataclass
class EpochHooks:
    """What a checkpointing caller plugs into ``train``.

    ``state``: a dict made by an earlier ``save`` call; training continues after
    its epoch. ``save(state, line)`` is called on every rank after each epoch
    (a collective such as ``ray.train.report`` must be reached by all ranks);
    ``state`` holds references to live tensors, so write or copy it at once.
    """

    state: dict | None = None
    save: Callable[[dict, dict], None] | None = None
    # Called once on rank 0 when the run has passed its set-up (student, method, optimiser built) and the
    # last run's weights are gone from out_dir: a caller writes its own run files (config.yaml) only then.
    start: Callable[[], None] | None = None


class _StudentLoss(nn.Module):
    """Student and method as one module, so DDP sees (and averages the gradients of) every trained parameter."""

    def __init__(self, model: nn.Module, method: Method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x, t_out, target):
        return self.method(self.method.student_outputs(self.model, x), t_out, target)


# -- optimisation ----------------------------------------------------------------------------


def build_optimizer(s: TrainSettings, modules: nn.Module) -> torch.optim.Optimizer:
    """timm's optimizer factory (LAMB, AdamW, SGD...), no weight decay on biases and norm layers."""
    from timm.optim import create_optimizer_v2

    opt = s.optimizer
    if opt == "sgd":  # timm's "sgd" means Nesterov; say which explicitly
        opt = "nesterov" if s.nesterov else "momentum"
    try:
        return create_optimizer_v2(modules, opt=opt, lr=s.lr, weight_decay=s.weight_decay, momentum=s.momentum)
    except (ValueError, AssertionError) as e:
        raise UserError(f"optimizer '{s.optimizer}': {e}") from e


def lr_factor(s: TrainSettings, steps_per_epoch: int):
    """The learning-rate multiplier at each optimiser step: linear warm-up, then cosine or step decay."""
    total, warmup = s.epochs * steps_per_epoch, int(s.warmup_epochs * steps_per_epoch)
    if s.schedule not in ("cosine", "step"):
        raise UserError(f"schedule must be cosine or step, not '{s.schedule}'")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if s.schedule == "step":
            return s.lr_gamma ** sum(step >= m * steps_per_epoch for m in s.lr_milestones)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return factor


# -- training --------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: nn.Module
    metrics: list[dict]
    seconds: float


@dataclass
class Setup:
    """What one training run is built from: the student, its method and optimiser, and how batches are made."""

    model: nn.Module
    method: Method
    forward: nn.Module  # student + method, under DDP when there are several ranks
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: ReplayLoader  # this rank's batches: views, targets, cached teacher outputs
    size: int  # the student's input size
    mean: tuple
    std: tuple
    precision: Precision
    ema: nn.Module | None  # timm's ModelEmaV3 of the student, or None
    card: StudentCard  # what timm needs beside the weights: the saved student's config.json


def check_teacher(s: TrainSettings, teacher: TeacherSource | None, views) -> None:
    if needs_teacher(s.method) and teacher is None:
        raise UserError(f"method '{s.method}' needs a teacher: pass --from-cache STORE (or --online --teacher NAME)")
    if teacher is not None and teacher.num_views is not None and views.num_views > teacher.num_views:
        raise UserError(
            f"the replay uses {views.num_views} views but the cached teacher has {teacher.num_views}: "
            "replay only the teacher's views, or extract the rest"
        )
    check_repeats(s, views)


def check_repeats(s: TrainSettings, views) -> None:
    """Refuse ``repeats`` larger than the views a replay has (an epoch takes R different views of each of its samples)."""
    if s.repeats > views.num_views:
        raise UserError(
            f"repeats {s.repeats} needs {s.repeats} different views of each sample in an epoch but the store has {views.num_views}: "
            f"extract with --views {s.repeats} or more, or lower repeats"
        )


@torch.no_grad()
def check_input_size(model: nn.Module, size: int, name: str) -> None:
    """Refuse, at set-up, a student that cannot take ``size`` px inputs (a ViT built for 224 given 32 px views): one
    forward of one image in eval mode (no statistics change, no random numbers drawn), not a traceback an epoch later."""
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as e:
        words = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        built = model.pretrained_cfg.get("input_size", (3, "?", "?"))[-1]
        raise UserError(f"student {name} cannot take {size} px inputs ({words[:160]}): pass --size {built} (what it is built for), "
                        f"or build it for {size} px with --student-arg img_size={size} (--model-arg for train)") from None
    finally:
        model.train(was_training)


def build_setup(s: TrainSettings, train_data: ImageDataset, views, plan: ViewPlan, teacher: TeacherSource | None, device, world: int) -> Setup:
    """Student, method, optimiser, schedule, DDP wrapper and renderer for one run."""
    extra = {} if s.drop_path is None else {"drop_path_rate": s.drop_path}
    precision = Precision(s.amp, device)  # refuses fp16 without CUDA before anything is built
    if train_data.num_classes < 2:
        log.warning("the training data has %d class: every label is the same, so its cross-entropy is 0 and teaches nothing", train_data.num_classes)
    model = build_student(s.student, train_data.num_classes, s.seed, s.student_weights, **s.student_kwargs, **extra)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    plan_size = views.store.record.plan.size if isinstance(views, StoredViews) else None
    size = s.size or plan_size or model.pretrained_cfg["input_size"][-1]
    check_input_size(model, size, s.student)
    cfg = model.pretrained_cfg
    method = build_method(s.method, s.method_args, model, teacher, num_classes=train_data.num_classes, size=size, epochs=s.epochs,
                          student_trained=s.student_weights is not None)
    method.train()
    model = method.wrap_student(model)  # what trains in the student's place (GPD: a widened network holding it)
    student_loss = _StudentLoss(_compiled(model) if s.compile else model, method).to(device)
    optimizer = build_optimizer(s, nn.ModuleList([model, method]))  # projectors train with the student
    if s.global_batch is not None and s.global_batch != s.batch_size * world:
        raise UserError(
            f"global_batch {s.global_batch} is not batch_size {s.batch_size} x {world} worker(s): "
            "state one of them (pipeline.commands resolves the other)"
        )
    if steps_per_epoch(len(train_data), views.block, s.batch_size, world, s.repeats) == 0:  # the loader would refuse it too, in its own words
        raise UserError(f"--batch-size {s.batch_size} is larger than a worker's share of the training set ({len(train_data)} samples, {world} worker(s))")
    loader = ReplayLoader(
        train_data, plan, views, s.batch_size, teachers={TEACHER: teacher} if teacher is not None else None,
        temperature=method.teacher_temperature, size=size, label_fraction=s.label_fraction, label_seed=s.label_seed, label_smoothing=s.label_smoothing, seed=s.seed, repeats=s.repeats, window_rows=s.window_rows, workers=s.workers, verify=s.verify,
    )
    forward = student_loss
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        on_gpu = torch.device(device).type == "cuda"
        forward = DistributedDataParallel(student_loss, device_ids=[torch.device(device)] if on_gpu else None)
    return Setup(
        model=model,
        method=method,
        forward=forward,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(s, len(loader))),
        loader=loader,
        size=size,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        precision=precision,
        ema=_model_ema(model, s.model_ema),
        card=StudentCard(s.student, dict(s.student_kwargs), train_data.num_classes, size, tuple(cfg.get("mean")), tuple(cfg.get("std")),
                         plan.recipe.eval_interpolation, plan.recipe.eval_crop, list(train_data.classes),
                         trained_on(s, train_data, teacher, views.store if isinstance(views, StoredViews) else None)),
    )


def train_one_epoch(run: Setup, s: TrainSettings, teacher: TeacherSource | None, epoch: int, device) -> dict:
    """One epoch of optimiser steps; the epoch's metrics line (losses averaged over every rank's steps)."""
    _, world = rank_and_world()
    run.model.train()
    run.method.epoch = epoch
    run.loader.set_epoch(epoch)
    progress = Progress(f"epoch {epoch + 1}/{s.epochs}", len(run.loader) * s.batch_size)
    sums, done, start = {}, 0, time.perf_counter()
    for batch in run.loader:
        batch = batch.to(device, non_blocking=True)
        x = to_input(batch.images, run.mean, run.std, device, s.channels_last)
        with run.precision.autocast():
            t_out = teacher_outputs(teacher, batch, run.method.teacher_temperature)
            loss, parts = run.forward(x, t_out, batch.targets)
        step(run, loss, s.clip_grad)
        for k, v in {"loss": loss.detach(), **parts}.items():  # summed on the device: no host sync per step
            sums[k] = sums.get(k, 0.0) + v
        done += 1
        progress.update(len(batch))
    sums = {k: float(v) for k, v in sums.items()}  # the epoch's one host sync
    seconds = time.perf_counter() - start
    if world > 1:  # rank 0 reports the mean over every rank's steps
        *totals, done = _all_sum([*sums.values(), done], device)
        sums, done = dict(zip(sums, totals)), int(done)
    return {
        "epoch": epoch + 1,
        **{f"train_{k}": v / max(done, 1) for k, v in sums.items()},
        "lr": run.optimizer.param_groups[0]["lr"],
        "seconds": round(seconds, 3),
        "views_per_s": round(done * s.batch_size / seconds, 1),
    }


def train(
    settings: TrainSettings,
    train_data: ImageDataset,
    val_data: ImageDataset | None,
    views,
    plan: ViewPlan,
    teacher: TeacherSource | None = None,
    out_dir: str | Path | None = None,
    weights_name: str = "student.safetensors",
    hooks: EpochHooks | None = None,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train ``settings.student`` on ``views`` (``StoredViews`` or ``DrawnViews``) of ``train_data``.

    Under an initialised ``torch.distributed`` the student is wrapped in DDP,
    each rank trains on its share of the units and ``out_dir`` is written by
    rank 0 only. ``hooks`` restore a saved state first and see every epoch's line.
    """
    s, hooks = settings, hooks or EpochHooks()
    rank, world = rank_and_world()
    check_teacher(s, teacher, views)
    run = build_setup(s, train_data, views, plan, teacher, device, world)
    if val_data is not None:
        val_data.sizes()  # every validation image's header, now: an unreadable one is refused before any epoch, as a training image is
    out_dir = Path(out_dir) if out_dir and rank == 0 else None
    metrics, first_epoch, start = [], 0, time.perf_counter()
    if hooks.state is not None:  # before the run's files change: a checkpoint that does not fit leaves them as they were
        first_epoch, metrics = _restore(hooks.state, run)
    if hooks.start and rank == 0:
        hooks.start()  # the caller's run files (and its lock on the folder) before anything in it changes
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (weights_name, "config.json", "README.md", *(f"{EMA_FOLDER}/{name}" for name in ("model.safetensors", "config.json", "README.md"))):
            (out_dir / stale).unlink(missing_ok=True)  # a stale result must not pass for this run's
    if rank == 0:
        log.info(epoch_note(len(train_data), views.block, s.batch_size, world, s.repeats))
        rule = f" (--lr-base {s.lr_base:g} at {s.lr_base_size}, {s.lr_base_scale})" if s.lr_base is not None else ""
        log.info("%s at a learning rate of %g%s for a global batch of %d, %s schedule; student %s", s.optimizer, s.lr, rule,
                 s.batch_size * world, s.schedule, f"from {s.student_weights}" if s.student_weights else "from random weights")
    if hooks.state is not None:
        log.info("continuing from the checkpoint after epoch %d of %d", first_epoch, s.epochs)
    with RunMetrics(out_dir, tuple(s.log), dataclasses.asdict(s)) as record:
        for line in metrics:  # a resumed run's record starts with the epochs it already has
            record.write(line)
        def keep(line: dict, epoch: int) -> None:  # the epoch's line and checkpoint
            metrics.append(line)
            if rank == 0:
                log.info("epoch %d/%d: %s", epoch + 1, s.epochs, ", ".join(f"{k} {v:.4g}" for k, v in line.items() if k != "epoch"))
            record.write(line)
            if hooks.save:
                hooks.save(_state(epoch + 1, metrics, run, s), line)

        if first_epoch == 0 and s.student_weights and val_data is not None:  # what fine-tuning starts from: epoch 0
            line = {"epoch": 0, **validate(run, s, val_data, plan, device)}
            metrics.append(line)
            record.write(line)
            if rank == 0:
                log.info("epoch 0 (the weights of %s, before any step): %s", s.student_weights, ", ".join(f"{k} {v:.4g}" for k, v in line.items() if k != "epoch"))
        for epoch in range(first_epoch, s.epochs):
            line = train_one_epoch(run, s, teacher, epoch, device)
            try:
                line.update(validate(run, s, val_data, plan, device))
            except UserError:
                keep(line, epoch)  # a validation image that fails to decode ends the run, not the epoch's training
                raise
            keep(line, epoch)
    if out_dir:
        save_student(out_dir, run.method.export_student(run.model).state_dict(), run.card, weights_name, metrics)
        if run.ema is not None:
            save_student(out_dir / EMA_FOLDER, run.method.export_student(run.ema.module).state_dict(), run.card, "model.safetensors", metrics, "val_top1_ema")
    return TrainResult(run.model, metrics, time.perf_counter() - start)


def validate(run: Setup, s: TrainSettings, val_data: ImageDataset | None, plan: ViewPlan, device) -> dict:
    """Validation top-1 of the student (and of its EMA), or nothing without validation data."""
    if val_data is None:
        return {}
    models = {"val_top1": run.model, **({"val_top1_ema": run.ema.module} if run.ema is not None else {})}
    return {
        key: evaluate(model, val_data, plan, run.size, run.mean, run.std, s.workers, device=device,
                      precision=run.precision, channels_last=s.channels_last)
        for key, model in models.items()
    }


def _state(epochs_done: int, metrics: list[dict], run: Setup, s: TrainSettings) -> dict:
    """Everything needed to continue after ``epochs_done`` epochs; data order is a function of (seed, epoch)."""
    # numpy's state as plain lists: a checkpoint then loads with torch.load(weights_only=True), nothing unpickled.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "epoch": epochs_done,
        "metrics": list(metrics),
        "model": run.model.state_dict(),
        # The plain student to write at the end (the same tensors as "model" unless the method wraps the student).
        "student_weights": run.method.export_student(run.model).state_dict(),
        "method": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.precision.scaler.state_dict(),
        **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
        "rng": rng,
        "student": run.card.to_dict(),  # what the Ray Train driver writes beside the weights
    }


def _restore(state: dict, run: Setup) -> tuple[int, list[dict]]:
    # A foreign or hand-edited checkpoint (the same settings, other weights) is one line, not load_state_dict's 40.
    parts = {"model": run.model, "method": run.method, "optimizer": run.optimizer, "scheduler": run.scheduler, "scaler": run.precision.scaler,
             **({"ema": run.ema} if run.ema is not None else {}), "rng": None}
    for part, target in parts.items():
        if part == "scaler" and part not in state:
            continue  # checkpoints written before the scaler was saved
        try:
            _set_rng(state[part]) if target is None else target.load_state_dict(state[part])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            detail = next((w.strip() for w in lines if "size mismatch" in w or "Missing" in w or "Unexpected" in w), lines[0].strip())
            raise UserError(
                f"the checkpoint's {part} state does not fit this run ({detail[:200]}): it was not written with these settings; "
                "drop --resume to start afresh"
            ) from e
    return state["epoch"], list(state["metrics"])


def _set_rng(rng: dict) -> None:
    """The random generators as ``_state`` saved them."""
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
