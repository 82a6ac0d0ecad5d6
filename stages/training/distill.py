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
import logging
import math
import time
from dataclasses import dataclass
from itertools import groupby, islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from storage import UserError

from ..data.datasets import ImageDataset
from ..methods import Method, Targets, build_method, needs_teacher
from .precision import Precision
from ..progress import Progress
from .run_metrics import RunMetrics
from .settings import TrainSettings
from ..data.replay import (
    StoredViews,
    Table,
    ViewRenderer,
    check_fingerprints,
    epoch_units,
    window_units,
    even_batches,
    labelled_mask,
    rebatch,
    render_batches,
    shuffle_windows,
    unit_table,
    with_images,
)
from .student import StudentCard, build_student, save_student
from ..teachers.teacher_sources import TeacherSource
from ..data.views import EVAL_FIELDS, ViewPlan, eval_params, mixed_targets, normalize

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
    if torch.device(device).type == "cuda":
        views = views.pin_memory()
    x = normalize(views.to(device, non_blocking=True), mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def teacher_outputs(teacher: TeacherSource | None, batch: Table, views: torch.Tensor, device, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """The teacher's outputs for a batch, as float32 on ``device`` (a live teacher under autocast gives bf16/fp16).

    ``temperature``: the method's (a top-k cache rebuilds its tail for it)."""
    if teacher is None:
        return {}
    if teacher.size is not None:  # a live teacher runs where the student does
        views = views.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True).float() for k, v in teacher.outputs(batch, views, temperature).items()}


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


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks: (0, 1) unless torch.distributed is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(values: list[float], device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def rank_units(units: list[tuple[int, int]], rank: int, world: int) -> list[tuple[int, int]]:
    """This rank's share of an epoch's (view, block) units: every world-th block's, so each rank reads its own
    shards; the consecutive units of one block (its repeated views) stay together on one rank."""
    groups = [list(g) for _, g in groupby(units, key=lambda unit: unit[1])]
    return [unit for g in groups[rank::world] for unit in g]


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


def steps_per_epoch(num_samples: int, block: int, batch_size: int, world: int, repeats: int = 1) -> int:
    """Optimiser steps every rank takes in every epoch.

    DDP hangs when ranks take different numbers of steps, and a rank's rows
    depend on which blocks the epoch's shuffle gives it. So every rank is cut
    to a bound that holds for all epochs: the fewest whole blocks a rank can
    get, with the short last block among them. With one rank it is the whole
    training set, as without DDP. With ``repeats`` R an epoch takes a share
    1 / R of the blocks, R views of each (``epoch_units``).
    """
    num_blocks = -(-num_samples // block)
    if num_blocks // repeats < world:
        if repeats > 1:
            raise UserError(
                f"with repeats {repeats} an epoch takes {num_blocks // repeats} of the store's {num_blocks} blocks, fewer than the {world} "
                f"workers: use at most {max(1, num_blocks // repeats)} workers, fewer repeats, or smaller blocks"
            )
        raise UserError(f"the store has {num_blocks} blocks of samples but {world} workers: use at most {num_blocks} workers")
    last = num_samples - (num_blocks - 1) * block
    return repeats * ((num_blocks // repeats // world - 1) * block + last) // batch_size


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


def targets(labels: np.ndarray, num_classes: int, smoothing: float, partner_labels=None, lam=None) -> Targets:
    """Hard labels and their (mixed, smoothed) target rows; label -1 (unlabelled) gives a zero row.

    ``partner_labels`` and ``lam`` describe mixed views (-1 / 1.0 where a view is not mixed).
    """
    n = len(labels)
    partner_labels = np.full(n, -1) if partner_labels is None else partner_labels
    lam = np.ones(n) if lam is None else lam
    soft, labelled = mixed_targets(labels, partner_labels, lam, num_classes, smoothing)
    return Targets(torch.where(labelled, torch.from_numpy(np.asarray(labels)).long(), -1), soft)


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
    renderer: ViewRenderer
    labels: np.ndarray  # (N,) the labels the student may use, -1 elsewhere
    size: int  # the student's input size
    mean: tuple
    std: tuple
    steps: int  # optimiser steps per epoch, the same on every rank
    plan_size: int | None  # the stored plan's render size; None for views drawn on the fly (nothing to verify)
    precision: Precision
    ema: nn.Module | None  # timm's ModelEmaV3 of the student, or None
    card: StudentCard  # what timm needs beside the weights: the saved student's config.json


def _check_policy(verify: str, ids: np.ndarray, view: int) -> np.ndarray:
    if verify == "all":
        return np.ones(len(ids), bool)
    if verify == "sample":  # about one view in a hundred, spread over samples and views
        return (ids * 7919 + view * 104729) % 100 == 0
    return np.zeros(len(ids), bool)


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
    steps = steps_per_epoch(len(train_data), views.block, s.batch_size, world, s.repeats)
    if steps == 0:
        raise UserError(f"--batch-size {s.batch_size} is larger than a worker's share of the training set ({len(train_data)} samples, {world} worker(s))")
    forward = student_loss
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        on_gpu = torch.device(device).type == "cuda"
        forward = DistributedDataParallel(student_loss, device_ids=[torch.device(device)] if on_gpu else None)
    sizes = (size,) if teacher is None or teacher.size is None else (size, teacher.size)
    return Setup(
        model=model,
        method=method,
        forward=forward,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(s, steps)),
        renderer=ViewRenderer(train_data, plan, sizes, plan_size),
        labels=np.where(labelled_mask(train_data.labels, s.label_fraction, s.label_seed), train_data.labels, -1),
        size=size,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        steps=steps,
        plan_size=plan_size,
        precision=precision,
        ema=_model_ema(model, s.model_ema),
        card=StudentCard(s.student, dict(s.student_kwargs), train_data.num_classes, size, tuple(cfg.get("mean")), tuple(cfg.get("std")),
                         plan.recipe.eval_interpolation, plan.recipe.eval_crop, list(train_data.classes)),
    )


def epoch_tables(run: Setup, s: TrainSettings, views, teacher: TeacherSource | None, epoch: int, rank: int, world: int) -> Iterator[Table]:
    """This rank's units of one epoch, each a table of rows: ids, view parameters, labels, teacher rows."""
    param_names = list(run.renderer.plan.fields)
    units = epoch_units(epoch, views.num_views, views.num_blocks, s.seed, s.repeats, run.renderer.plan.recipe.mix_pair_views)
    for v, b in rank_units(units, rank, world):
        table = unit_table(views, v, b, run.labels, param_names)  # a mixing partner is in the same unit
        table = with_images(table, run.renderer.dataset)  # shard datasets: the unit's images in one pass
        table.update(teacher.unit_rows(v, b, len(table["id"])) if teacher else {})
        if run.plan_size is not None:
            table["check"] = _check_policy(s.verify, table["id"], v)
        yield table


def batch_targets(run: Setup, batch: Table, rendered: dict, num_classes: int, smoothing: float) -> Targets:
    """The hard and soft targets of a batch; a mixed view's is the mixed target, weighted by the student's own lam."""
    partner_labels, lam = None, None
    if "mix_partner" in batch:
        partner = batch["mix_partner"]
        partner_labels = np.where(partner >= 0, run.labels[np.maximum(partner, 0)], -1)
        lam = rendered["lam"][:, 0].numpy()
    return targets(batch["label"], num_classes, smoothing, partner_labels, lam)


def train_one_epoch(run: Setup, s: TrainSettings, views, teacher: TeacherSource | None, epoch: int, num_classes: int, device) -> dict:
    """One epoch of optimiser steps; the epoch's metrics line (losses averaged over every rank's steps)."""
    rank, world = rank_and_world()
    run.model.train()
    run.method.epoch = epoch
    progress = Progress(f"epoch {epoch + 1}/{s.epochs}", run.steps * s.batch_size)
    rng = np.random.default_rng([s.seed, epoch, 2] + ([rank] if world > 1 else []))
    window = window_units(s.window_rows, views.block, s.repeats)  # a block's repeated views share a window
    tables = epoch_tables(run, s, views, teacher, epoch, rank, world)
    # Every rank takes exactly ``steps`` batches (see steps_per_epoch); its other rows wait for another epoch.
    # With repeats, a sample's views travel together: one decode of its image renders all of them (see shuffle_windows).
    batches = islice(rebatch(shuffle_windows(tables, window, rng, by_sample=s.repeats > 1), s.batch_size, drop_last=True), run.steps)
    check = "check" if run.plan_size is not None else None
    sums, done, start = {}, 0, time.perf_counter()
    for batch, rendered in render_batches(run.renderer, batches, list(run.renderer.plan.fields), s.workers, check):
        if check:
            check_fingerprints(batch, rendered["fingerprint"].numpy(), views.store, batch["check"])
        x = to_input(rendered["views"][0], run.mean, run.std, device, s.channels_last)
        target = batch_targets(run, batch, rendered, num_classes, s.label_smoothing)
        target = Targets(target.labels.to(device, non_blocking=True), target.soft.to(device, non_blocking=True))
        with run.precision.autocast():
            t_out = teacher_outputs(teacher, batch, rendered["views"][-1], device, run.method.teacher_temperature)
            loss, parts = run.forward(x, t_out, target)
        step(run, loss, s.clip_grad)
        for k, v in {"loss": loss.detach(), **parts}.items():  # summed on the device: no host sync per step
            sums[k] = sums.get(k, 0.0) + v
        done += 1
        progress.update(len(batch["id"]))
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
    out_dir = Path(out_dir) if out_dir and rank == 0 else None
    metrics, first_epoch, start = [], 0, time.perf_counter()
    if hooks.state is not None:  # before the run's files change: a checkpoint that does not fit leaves them as they were
        first_epoch, metrics = _restore(hooks.state, run)
    if hooks.start and rank == 0:
        hooks.start()  # the caller's run files (and its lock on the folder) before anything in it changes
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in (weights_name, "config.json", f"{EMA_FOLDER}/model.safetensors", f"{EMA_FOLDER}/config.json"):
            (out_dir / stale).unlink(missing_ok=True)  # a stale result must not pass for this run's
    if hooks.state is not None:
        log.info("continuing from the checkpoint after epoch %d of %d", first_epoch, s.epochs)
    with RunMetrics(out_dir) as record:
        for line in metrics:  # a resumed run's record starts with the epochs it already has
            record.write(line)
        for epoch in range(first_epoch, s.epochs):
            line = {**train_one_epoch(run, s, views, teacher, epoch, train_data.num_classes, device), **validate(run, s, val_data, plan, device)}
            metrics.append(line)
            if rank == 0:
                log.info("epoch %d/%d: %s", epoch + 1, s.epochs, ", ".join(f"{k} {v:.4g}" for k, v in line.items() if k != "epoch"))
            record.write(line)
            if hooks.save:
                hooks.save(_state(epoch + 1, metrics, run, s), line)
    if out_dir:
        save_student(out_dir, run.method.export_student(run.model).state_dict(), run.card, weights_name)
        if run.ema is not None:
            save_student(out_dir / EMA_FOLDER, run.method.export_student(run.ema.module).state_dict(), run.card, "model.safetensors")
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
    for part, target in (("model", run.model), ("method", run.method), ("optimizer", run.optimizer), ("scheduler", run.scheduler)):
        try:
            target.load_state_dict(state[part])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            detail = next((w.strip() for w in lines if "size mismatch" in w or "Missing" in w or "Unexpected" in w), lines[0].strip())
            raise UserError(
                f"the checkpoint's {part} state does not fit this run ({detail[:200]}): it was not written with these settings; "
                "drop --resume to start afresh"
            ) from e
    if "scaler" in state:
        run.precision.scaler.load_state_dict(state["scaler"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng"]["torch"])
    kind, keys, pos, has_gauss, gauss = state["rng"]["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["epoch"], list(state["metrics"])
