"""timm training tasks that distil from cached teacher outputs instead of a live teacher.

``CachedLogitDistillationTask``, ``CachedFeatureDistillationTask`` and
``CachedTokenDistillationTask`` mirror timm's ``LogitDistillationTask``,
``FeatureDistillationTask`` and ``TokenDistillationTask`` (``timm.task``), with
one difference: the teacher's outputs for the batch are passed in,
``task(input, target, teacher)``, where ``teacher`` is one teacher's entry of
the loader's ``Batch.teachers`` (``{"logits": (B, C), "features": (B, D), ...}``)
or a plain tensor.

Why subclass timm's tasks (and not ``TrainingTask``): everything in them except
the teacher forward is what we want, and it is most of the code. Their
constructors resolve the three weighting modes (independent, complementary,
default), the criterion (``resolve_classification_loss``), the token task's
checks and ``set_distilled_training(True)``, and the feature task's projection
(``FeatureDistillationTrainableModule``); the feature task also brings
``get_eval_model`` (the bare student), ``get_task_state`` / ``load_task_state``
(the projection, so checkpoints move between timm's task and ours),
``get_clip_parameters``, and every task ``train()``, ``prepare_distributed()``
and ``compile()``. Those constructors need a teacher, so each cached task hands
them a stand-in (``_NoLiveTeacher``): a ``DistillationTeacher`` with no
parameters that compiles to nothing and raises if anything tries to run it.
Only ``forward`` is written here, with the loss arithmetic of timm's own
``forward`` (timm keeps it inline, so it cannot be called), reading the teacher
tensor from the batch where timm runs ``self.teacher``. Subclassing also keeps
``isinstance(task, timm.task.LogitDistillationTask)`` true for code that asks.

Cached outputs are taken as the teacher's outputs for exactly the input the
student sees (timm's normalisation for the teacher, ``teacher.normalize_input``,
was applied when they were computed); they are moved to the student output's
device and dtype, where a live teacher beside the student would have produced
them (under autocast too).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import DistillationTeacher, FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask

__all__ = ["CachedLogitDistillationTask", "CachedFeatureDistillationTask", "CachedTokenDistillationTask"]

TeacherOutputs = Union[Mapping[str, torch.Tensor], torch.Tensor]


class _NoLiveTeacher(DistillationTeacher):
    """What timm's task constructors get as ``teacher_model``: the outputs come with each batch, so it never runs."""

    def __init__(self, device: Optional[torch.device], dtype: Optional[torch.dtype]):
        super().__init__(nn.Identity(), device=device, dtype=dtype)

    def compile(self, *args, **kwargs) -> "_NoLiveTeacher":
        return self  # timm's compile() compiles its teacher too; there is nothing here to compile

    def forward(self, *args, **kwargs) -> torch.Tensor:
        raise RuntimeError(
            "a cached distillation task has no live teacher: pass the teacher's outputs as task(input, target, teacher)"
        )


def _teacher_output(teacher: TeacherOutputs, key: str, like: torch.Tensor) -> torch.Tensor:
    """``teacher[key]`` (or ``teacher`` itself when it is a tensor), checked against ``like`` and placed beside it."""
    if isinstance(teacher, torch.Tensor):
        out = teacher
    elif key in teacher:
        out = teacher[key]
    else:
        have = ", ".join(sorted(teacher)) or "nothing"
        raise ValueError(
            f"this task needs the teacher's '{key}', and the batch's teacher outputs hold {have}: load the cache with needs=['{key}']"
        )
    if out.shape != like.shape:
        # mse_loss would broadcast a mismatch (with only a warning): a cache of another teacher, or a wrong teacher_dim.
        raise ValueError(
            f"the teacher's '{key}' has shape {tuple(out.shape)}, and the student's side has {tuple(like.shape)}"
        )
    return out.detach().to(device=like.device, dtype=like.dtype, non_blocking=True)


def _soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """timm's distillation KL: batch-mean KL(teacher || student) at ``temperature``, scaled by T^2."""
    prob_s = F.log_softmax(student_logits / temperature, dim=-1)
    prob_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(prob_s, prob_t, reduction="batchmean", log_target=True) * (temperature**2)


class CachedLogitDistillationTask(LogitDistillationTask):
    """timm's ``LogitDistillationTask`` with the teacher's logits read from the batch.

    ``loss = task_loss_weight * criterion(student, target) + distill_loss_weight * T^2 * KL(teacher_T || student_T)``.

    Args:
        student_model: Student model to train (a timm model: its ``pretrained_cfg`` is read, as in timm).
        criterion: Task loss; when None, ``create_classification_loss(**criterion_kwargs)``
            (e.g. ``criterion_kwargs=dict(soft_targets=True)`` for mixed target rows).
        criterion_kwargs: Arguments for ``create_classification_loss`` when ``criterion`` is None.
        distill_loss_weight: Weight of the KD loss. Set: independent weights (task weight
            defaults to 1). Unset with ``task_loss_weight`` set: complementary (1 - task weight).
            Both unset: both 1.
        task_loss_weight: Weight of the task loss (see ``distill_loss_weight``).
        temperature: Softmax temperature of the KD loss. For a top-k cache, decode the teacher's
            logits at this temperature (the tail is rebuilt for it).
        device: Device for task tensors and buffers (default cpu).
        dtype: Dtype for task tensors and buffers (default torch's).
        verbose: Log the resolved settings.
        loss_type: Distillation loss; only ``'kl'``, as in timm.

    Returns:
        A ``TrainingTask``; calling it, ``task(input, target, teacher)``, returns a dict with
        ``loss`` (to backpropagate), ``output`` (student logits), ``task_loss`` and ``kd_loss``.
        ``teacher`` is one teacher's outputs for the batch, ``{"logits": (B, C), ...}``, or the
        (B, C) logits themselves; a dict without ``logits`` raises ``ValueError``.

    Example:
        ```python
        task = CachedLogitDistillationTask(student, criterion_kwargs=dict(soft_targets=True), task_loss_weight=0.3, temperature=4.0)
        for batch in loader:
            x = normalize(batch.images.to(device), student.pretrained_cfg["mean"], student.pretrained_cfg["std"])
            out = task(x, batch.targets.soft.to(device), batch.teachers["beitv2_l"])
            out["loss"].backward()
        ```
    """

    def __init__(
        self,
        student_model: nn.Module,
        criterion: Optional[nn.Module] = None,
        criterion_kwargs: Optional[Dict[str, Any]] = None,
        distill_loss_weight: Optional[float] = None,
        task_loss_weight: Optional[float] = None,
        temperature: float = 1.0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
        *,
        loss_type: str = "kl",
    ):
        super().__init__(
            student_model,
            _NoLiveTeacher(device, dtype),
            criterion=criterion,
            criterion_kwargs=criterion_kwargs,
            loss_type=loss_type,
            distill_loss_weight=distill_loss_weight,
            task_loss_weight=task_loss_weight,
            temperature=temperature,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        """One step's losses: ``input`` (B, 3, H, W) normalised for the student, ``target`` (B,) or (B, C), ``teacher`` as above."""
        student_logits = self.trainable_module(input)
        task_loss = self.criterion(student_logits, target)
        kd_loss = _soft_kl(student_logits, _teacher_output(teacher, "logits", student_logits), self.temperature)
        total_loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        return {"loss": total_loss, "output": student_logits, "task_loss": task_loss, "kd_loss": kd_loss}


class CachedFeatureDistillationTask(FeatureDistillationTask):
    """timm's ``FeatureDistillationTask`` with the teacher's pooled pre-logits features read from the batch.

    ``loss = task_loss_weight * criterion(student, target) + distill_loss_weight * MSE(proj(student_features), teacher_features)``,
    where ``proj`` is a trainable ``nn.Linear(student_dim, teacher_dim)`` when the widths differ
    (timm's ``FeatureDistillationTrainableModule``) and the identity otherwise. The projection is
    task state: ``get_task_state()`` / ``load_task_state()`` save and restore it, and
    ``get_eval_model()`` is the bare student.

    Args:
        student_model: Student model to train (needs ``forward_features`` / ``forward_head``).
        teacher_dim: Width D of the cached features (the store's ``feature_dim``).
        criterion: Task loss; when None, ``create_classification_loss(**criterion_kwargs)``.
        criterion_kwargs: Arguments for ``create_classification_loss`` when ``criterion`` is None.
        distill_loss_weight: Weight of the feature loss (modes as in ``CachedLogitDistillationTask``).
        task_loss_weight: Weight of the task loss.
        student_feature_dim: Student pre-logits width (default: the model's ``head_hidden_size`` / ``num_features``).
        device: Device for task tensors, buffers and the projection (default cpu).
        dtype: Dtype for task tensors, buffers and the projection (default torch's).
        verbose: Log the resolved settings.

    Returns:
        A ``TrainingTask``; ``task(input, target, teacher)`` returns ``loss``, ``output`` (student
        logits), ``task_loss`` and ``kd_loss``. ``teacher`` is ``{"features": (B, D), ...}`` or the
        (B, D) features themselves; a dict without ``features`` raises ``ValueError``.

    Example:
        ```python
        task = CachedFeatureDistillationTask(student, teacher_dim=store.teacher_info("beitv2_l").feature_dim, distill_loss_weight=5.0)
        for batch in loader:
            x = normalize(batch.images.to(device), student.pretrained_cfg["mean"], student.pretrained_cfg["std"])
            out = task(x, batch.targets.soft.to(device), batch.teachers["beitv2_l"])
            out["loss"].backward()
        ```
    """

    def __init__(
        self,
        student_model: nn.Module,
        teacher_dim: int,
        criterion: Optional[nn.Module] = None,
        criterion_kwargs: Optional[Dict[str, Any]] = None,
        distill_loss_weight: Optional[float] = None,
        task_loss_weight: Optional[float] = None,
        student_feature_dim: Optional[int] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
    ):
        super().__init__(
            student_model,
            _NoLiveTeacher(device, dtype),
            criterion=criterion,
            criterion_kwargs=criterion_kwargs,
            distill_loss_weight=distill_loss_weight,
            task_loss_weight=task_loss_weight,
            student_feature_dim=student_feature_dim,
            teacher_feature_dim=int(teacher_dim),
            device=device,
            dtype=dtype,
            verbose=verbose,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        """One step's losses: ``input`` (B, 3, H, W) normalised for the student, ``target`` (B,) or (B, C), ``teacher`` as above."""
        student_logits, student_features = self.trainable_module(input)
        task_loss = self.criterion(student_logits, target)
        kd_loss = F.mse_loss(student_features, _teacher_output(teacher, "features", student_features))
        total_loss = self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss
        return {"loss": total_loss, "output": student_logits, "task_loss": task_loss, "kd_loss": kd_loss}


class CachedTokenDistillationTask(TokenDistillationTask):
    """timm's ``TokenDistillationTask`` (DeiT's distillation token) with the teacher's logits read from the batch.

    The student's class head is trained on ``target``; its distillation head on the teacher's
    *logits* (timm's token task reads the teacher's class logits, not its tokens):
    ``'soft'``: T^2 * KL(teacher_T || dist_head_T); ``'hard'``: cross-entropy with the teacher's argmax.

    Args:
        student_model: A model with a distillation head (``set_distilled_training``, e.g. timm's
            ``deit_*_distilled_*``); it is switched to distilled training, as in timm.
        criterion: Task loss of the class head; when None, ``create_classification_loss(**criterion_kwargs)``.
        criterion_kwargs: Arguments for ``create_classification_loss`` when ``criterion`` is None.
        distill_type: ``'soft'`` or ``'hard'``.
        distill_loss_weight: Weight of the distillation loss (modes as in ``CachedLogitDistillationTask``).
        task_loss_weight: Weight of the task loss.
        temperature: Softmax temperature of the soft loss (unused by ``'hard'``).
        device: Device for task tensors and buffers (default cpu).
        dtype: Dtype for task tensors and buffers (default torch's).
        verbose: Log the resolved settings.

    Returns:
        A ``TrainingTask``; ``task(input, target, teacher)`` returns ``loss``, ``output`` (class-head
        logits), ``task_loss``, and the distillation loss under both ``kd_loss`` (as the other cached
        tasks) and ``distill_loss`` (timm's token task's name). ``teacher`` is ``{"logits": (B, C), ...}``
        or the (B, C) logits themselves; a dict without ``logits`` raises ``ValueError``.

    Example:
        ```python
        task = CachedTokenDistillationTask(deit_student, distill_type="hard", task_loss_weight=0.5)
        for batch in loader:
            x = normalize(batch.images.to(device), deit_student.pretrained_cfg["mean"], deit_student.pretrained_cfg["std"])
            out = task(x, batch.targets.soft.to(device), batch.teachers["beitv2_l"])
            out["loss"].backward()
        ```
    """

    def __init__(
        self,
        student_model: nn.Module,
        criterion: Optional[nn.Module] = None,
        criterion_kwargs: Optional[Dict[str, Any]] = None,
        distill_type: str = "soft",
        distill_loss_weight: Optional[float] = None,
        task_loss_weight: Optional[float] = None,
        temperature: float = 1.0,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
    ):
        super().__init__(
            student_model,
            _NoLiveTeacher(device, dtype),
            criterion=criterion,
            criterion_kwargs=criterion_kwargs,
            distill_type=distill_type,
            distill_loss_weight=distill_loss_weight,
            task_loss_weight=task_loss_weight,
            temperature=temperature,
            device=device,
            dtype=dtype,
            verbose=verbose,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        """One step's losses: ``input`` (B, 3, H, W) normalised for the student, ``target`` (B,) or (B, C), ``teacher`` as above."""
        main_logits, dist_logits = self.trainable_module(input)
        task_loss = self.criterion(main_logits, target)
        teacher_logits = _teacher_output(teacher, "logits", dist_logits)
        if self.distill_type == "soft":
            distill_loss = _soft_kl(dist_logits, teacher_logits, self.temperature)
        else:
            distill_loss = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
        total_loss = self.task_loss_weight * task_loss + self.distill_loss_weight * distill_loss
        return {
            "loss": total_loss,
            "output": main_logits,
            "task_loss": task_loss,
            "kd_loss": distill_loss,
            "distill_loss": distill_loss,
        }
