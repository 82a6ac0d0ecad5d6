"""A run set up once: the student, its method, optimiser, schedule, loader, precision and EMA, every check before the first step."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from storage import UserError

from ...data.datasets import ImageDataset
from ...methods import Method, build_method
from ..precision import Precision
from ..settings import TrainSettings
from ...data.replay import StoredViews
from ..loader import ReplayLoader
from ..student import run_student
from ..student_card import StudentCard, trained_on
from ...teachers.teacher_sources import TeacherSource
from ...data.views import ViewPlan
from .optimisation import build_optimizer, lr_factor
from .ranks import check_batch


log = logging.getLogger(__name__)

TEACHER = "teacher"  # the run's teacher source in its loader's ``teachers``


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


class _StudentLoss(nn.Module):
    """Student and method as one module, so DDP sees (and averages the gradients of) every trained parameter."""

    def __init__(self, model: nn.Module, method: Method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x, t_out, target):
        return self.method(self.method.student_outputs(self.model, x), t_out, target)


def check_teacher(s: TrainSettings, teacher: TeacherSource | None, views) -> None:
    if s.methods.needs_teacher and teacher is None:
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
        raise UserError(
            f"student {name} cannot take {size} px inputs ({words[:160]}): pass --size {built} (what it is built for), "
            f"or build it for {size} px with --student-arg img_size={size} (--model-arg for train)"
        ) from None
    finally:
        model.train(was_training)


def build_setup(
    s: TrainSettings, train_data: ImageDataset, views, plan: ViewPlan, teacher: TeacherSource | None, device, world: int
) -> Setup:
    """Student, method, optimiser, schedule, DDP wrapper and renderer for one run."""
    precision = Precision(s.amp, device)  # refuses fp16 without CUDA before anything is built
    if train_data.num_classes < 2:
        log.warning(
            "the training data has %d class: every label is the same, so its cross-entropy is 0 and teaches nothing",
            train_data.num_classes,
        )
    student, method, size = _student_and_method(s, train_data.num_classes, views, teacher)
    cfg = student.pretrained_cfg
    model = method.wrap_student(student)  # what trains in the student's place (GPD: a widened network holding it)
    student_loss = _StudentLoss(_compiled(model) if s.compile else model, method).to(device)
    optimizer = build_optimizer(s, nn.ModuleList([model, method]))  # projectors train with the student
    check_batch(s, "the run", size=size, samples=len(train_data), block=views.block, world=world)
    loader = ReplayLoader(
        train_data,
        plan,
        views,
        s.batch_size,
        teachers={TEACHER: teacher} if teacher is not None else None,
        temperature=method.teacher_temperature,
        size=size,
        label_fraction=s.label_fraction,
        label_seed=s.label_seed,
        label_smoothing=s.label_smoothing,
        seed=s.seed,
        repeats=s.repeats,
        window_rows=s.window_rows,
        workers=s.workers,
        verify=s.verify,
    )
    return Setup(
        model=model,
        method=method,
        forward=_distributed(student_loss, device) if world > 1 else student_loss,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(s, len(loader))),
        loader=loader,
        size=size,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        precision=precision,
        ema=_model_ema(model, s.model_ema),
        card=StudentCard(
            s.student,
            dict(s.student_kwargs),
            train_data.num_classes,
            size,
            tuple(cfg.get("mean")),
            tuple(cfg.get("std")),
            plan.recipe.eval_interpolation,
            plan.recipe.eval_crop,
            list(train_data.classes),
            trained_on(s, train_data, teacher, views.store if isinstance(views, StoredViews) else None),
        ),
    )


def _student_and_method(s: TrainSettings, num_classes: int, views, teacher) -> tuple[nn.Module, Method, int]:
    """The student (in channels-last when asked), the run's method over it, and the size it trains at (the setting,
    else the store's view size, else the student's own input size)."""
    model = run_student(s, num_classes)
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    plan_size = views.store.record.plan.size if isinstance(views, StoredViews) else None
    size = s.size or plan_size or model.pretrained_cfg["input_size"][-1]
    check_input_size(model, size, s.student)
    method = build_method(
        s.methods,
        s.method_args,
        model,
        teacher,
        num_classes=num_classes,
        size=size,
        epochs=s.epochs,
        student_trained=s.student_weights is not None,
    )
    method.train()
    return model, method, size


def _distributed(student_loss: nn.Module, device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    on_gpu = torch.device(device).type == "cuda"
    return DistributedDataParallel(student_loss, device_ids=[torch.device(device)] if on_gpu else None)
