"""The loop: epochs of optimiser steps over the replayed views, validation, the run's files at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from storage import UserError

from ...data.datasets import ImageDataset
from ..precision import Precision
from ...progress import Progress
from ..run_metrics import RunMetrics
from ..settings import TrainSettings
from ...data.replay import ViewRenderer, even_batches, render_batches
from ..batch import Batch
from ..epoch_steps import epoch_note, rank_and_world
from ..student_files import save_student
from ...teachers.teacher_sources import TeacherSource
from ...data.views import EVAL_FIELDS, ViewPlan, eval_params, normalize
from .checkpoint import EpochHooks, _restore, _state
from .ranks import _all_sum
from .setup import EMA_FOLDER, TEACHER, Setup, build_setup, check_teacher


log = logging.getLogger(__name__)


def teacher_outputs(teacher: TeacherSource | None, batch: Batch, temperature) -> dict[str, torch.Tensor]:
    """The teacher's outputs for a batch already on the student's device, as float32 (a live teacher under autocast gives bf16/fp16).

    A cached teacher's came with the batch (the loader decoded them at the method's ``temperature``); a live one runs here."""
    if teacher is None:
        return {}
    if teacher.size is None:
        return batch.teachers[TEACHER]
    return {k: v.float() for k, v in teacher.outputs(batch.rows, batch.teacher_images, temperature).items()}


def to_input(views: torch.Tensor, mean, std, device, channels_last: bool = False) -> torch.Tensor:
    """uint8 views -> the model's normalised input on ``device``: a quarter of float32's bytes cross the bus."""
    if torch.device(device).type == "cuda" and views.device.type == "cpu":
        views = views.pin_memory()
    x = normalize(views.to(device, non_blocking=True), mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class TrainResult:
    model: nn.Module
    metrics: list[dict]
    seconds: float


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
    start = time.perf_counter()
    first_epoch, metrics = _begin(run, s, hooks, out_dir, weights_name, rank)
    if rank == 0:
        _say_start(s, len(train_data), views.block, world)
    if hooks.state is not None:
        log.info("continuing from the checkpoint after epoch %d of %d", first_epoch, s.epochs)
    with RunMetrics(out_dir, tuple(s.log), dataclasses.asdict(s)) as record:
        for line in metrics:  # a resumed run's record starts with the epochs it already has
            record.write(line)
        if first_epoch == 0 and s.student_weights and val_data is not None:  # what fine-tuning starts from: epoch 0
            metrics.append(_epoch_zero(run, s, val_data, plan, device, record, rank))
        keep = Keep(run, s, metrics, record, hooks, rank)
        for epoch in range(first_epoch, s.epochs):
            _one_epoch(run, s, teacher, val_data, plan, device, epoch, keep)
    if out_dir:
        _save_results(out_dir, run, weights_name, metrics)
    return TrainResult(run.model, metrics, time.perf_counter() - start)


@dataclass
class Keep:
    """Where an epoch's line goes: the run's lines, its metrics record, the log (rank 0) and the checkpoint hook."""

    run: Setup
    s: TrainSettings
    metrics: list
    record: RunMetrics
    hooks: EpochHooks
    rank: int

    def __call__(self, line: dict, epoch: int) -> None:
        self.metrics.append(line)
        if self.rank == 0:
            log.info("epoch %d/%d: %s", epoch + 1, self.s.epochs, _shown(line))
        self.record.write(line)
        if self.hooks.save:
            self.hooks.save(_state(epoch + 1, self.metrics, self.run, self.s), line)


def _one_epoch(run, s: TrainSettings, teacher, val_data, plan, device, epoch: int, keep: Keep) -> None:
    line = train_one_epoch(run, s, teacher, epoch, device)
    try:
        line.update(validate(run, s, val_data, plan, device))
    except UserError:
        keep(line, epoch)  # a validation image that fails to decode ends the run, not the epoch's training
        raise
    keep(line, epoch)


def _begin(run, s: TrainSettings, hooks: EpochHooks, out_dir: Path | None, weights_name: str, rank: int):
    """(first epoch, earlier epochs' lines): a checkpoint restored before the run's files change (one that does not
    fit leaves them as they were), then the caller's run files and an earlier run's results cleared."""
    first_epoch, metrics = _restore(hooks.state, run) if hooks.state is not None else (0, [])
    if hooks.start and rank == 0:
        hooks.start()  # the caller's run files (and its lock on the folder) before anything in it changes
    if out_dir:
        _clear_results(out_dir, weights_name)
    return first_epoch, metrics


def _clear_results(out_dir: Path, weights_name: str) -> None:
    """The folder made, and an earlier run's student, config.json and card gone: a stale result must not pass for this run's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (
        weights_name,
        "config.json",
        "README.md",
        *(f"{EMA_FOLDER}/{name}" for name in ("model.safetensors", "config.json", "README.md")),
    ):
        (out_dir / stale).unlink(missing_ok=True)


def _save_results(out_dir: Path, run: Setup, weights_name: str, metrics: list[dict]) -> None:
    """The trained student as a timm model folder (weights, config.json, card), and the EMA's as its own."""
    save_student(out_dir, run.method.export_student(run.model).state_dict(), run.card, weights_name, metrics)
    if run.ema is not None:
        save_student(
            out_dir / EMA_FOLDER,
            run.method.export_student(run.ema.module).state_dict(),
            run.card,
            "model.safetensors",
            metrics,
            "val_top1_ema",
        )


def _epoch_zero(
    run: Setup, s: TrainSettings, val_data: ImageDataset, plan: ViewPlan, device, record: RunMetrics, rank: int
) -> dict:
    """The line of the weights a run starts from, evaluated before any step, written as epoch 0."""
    line = {"epoch": 0, **validate(run, s, val_data, plan, device)}
    record.write(line)
    if rank == 0:
        log.info("epoch 0 (the weights of %s, before any step): %s", s.student_weights, _shown(line))
    return line


def _say_start(s: TrainSettings, samples: int, block: int, world: int) -> None:
    """A run's first lines: what an epoch holds, and the optimiser, rate and global batch it trains with."""
    log.info(epoch_note(samples, block, s.batch_size, world, s.repeats))
    rule = f" (--lr-base {s.lr_base:g} at {s.lr_base_size}, {s.lr_base_scale})" if s.lr_base is not None else ""
    log.info(
        "%s at a learning rate of %g%s for a global batch of %d, %s schedule; student %s",
        s.optimizer,
        s.lr,
        rule,
        s.batch_size * world,
        s.schedule,
        f"from {s.student_weights}" if s.student_weights else "from random weights",
    )


def _shown(line: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in line.items() if k != "epoch")


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


def validate(run: Setup, s: TrainSettings, val_data: ImageDataset | None, plan: ViewPlan, device) -> dict:
    """Validation top-1 of the student (and of its EMA), or nothing without validation data."""
    if val_data is None:
        return {}
    models = {"val_top1": run.model, **({"val_top1_ema": run.ema.module} if run.ema is not None else {})}
    return {
        key: evaluate(
            model,
            val_data,
            plan,
            run.size,
            run.mean,
            run.std,
            s.workers,
            device=device,
            precision=run.precision,
            channels_last=s.channels_last,
        )
        for key, model in models.items()
    }


@torch.no_grad()
def evaluate(
    model,
    dataset: ImageDataset,
    plan: ViewPlan,
    size: int,
    mean,
    std,
    workers=0,
    batch_size=256,
    device="cpu",
    precision: Precision | None = None,
    channels_last: bool = False,
) -> float:
    """Top-1 accuracy on deterministic centre-crop views; under DDP each rank scores every world-th sample."""
    model.eval()
    rank, world = rank_and_world()
    ids = np.arange(len(dataset))[rank::world]
    table = {
        "id": ids,
        "label": dataset.labels[ids],
        **eval_params(dataset.sizes()[ids], plan.recipe.eval_crop, plan.recipe.eval_interpolation),
    }
    renderer = ViewRenderer(dataset, plan, (size,))
    correct = 0
    for batch, rendered in render_batches(renderer, even_batches(table, batch_size), list(EVAL_FIELDS), workers):
        with precision.autocast() if precision else contextlib.nullcontext():
            logits = model(to_input(rendered["views"][0], mean, std, device, channels_last))
        correct += int((logits.argmax(1).cpu().numpy() == batch["label"]).sum())
    if world > 1:
        correct = int(_all_sum([correct], device)[0])
    return correct / len(dataset)


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
