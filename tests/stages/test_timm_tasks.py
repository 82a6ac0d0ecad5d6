"""The cached timm tasks against timm's own tasks with a live teacher: same losses, same student gradients.

The teacher (timm's ``test_resnet``) normalises with mean = std = 0.5 where the
students use ImageNet's, and is 96 wide where ``resnet10t`` is 512: timm's
renormalisation and the feature projection are both exercised. The teacher
outputs handed to the cached task are computed along timm's own path
(``task.teacher.normalize_input`` and ``task.teacher``).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.task import FeatureDistillationTask, LogitDistillationTask, TokenDistillationTask

from stages.timm_tasks import CachedFeatureDistillationTask, CachedLogitDistillationTask, CachedTokenDistillationTask

B, C, S = 8, 10, 32


def _student():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=C)


def _deit_student():
    torch.manual_seed(0)  # a DeiT with a distillation token, cut to two blocks: 32 px in 16 px patches
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=C, img_size=S, depth=2)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(1)
    return timm.create_model("test_resnet", pretrained=False, num_classes=C).eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, 3, S, S, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    # Mixup-style rows: two classes mixed 0.7 / 0.3, then smoothed.
    mixed = 0.7 * torch.nn.functional.one_hot(labels, C) + 0.3 * torch.nn.functional.one_hot(labels.roll(1), C)
    soft = mixed * 0.9 + 0.1 / C
    return x, labels, soft


def _live_outputs(timm_task, x):
    """The teacher's outputs exactly as timm's task computes them inside its forward."""
    with torch.no_grad():
        x_kd = timm_task.teacher.normalize_input(x, timm_task.student_mean, timm_task.student_std)
        return {
            "logits": timm_task.teacher(x_kd.detach()),
            "features": timm_task.teacher(x_kd.detach(), return_features=True),
        }


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same_step(timm_task, ours, x, target, teacher_outputs, kd_key="kd_loss"):
    timm_task.train()
    ours.train()
    ref, out = timm_task(x, target), ours(x, target, teacher_outputs)
    for key in ("loss", "task_loss"):
        torch.testing.assert_close(out[key], ref[key])
    torch.testing.assert_close(out["kd_loss"], ref[kd_key])
    torch.testing.assert_close(out["output"], ref["output"])
    assert out["kd_loss"] > 0 and out["task_loss"] > 0  # a zero loss on both sides would prove nothing
    ref["loss"].backward()
    out["loss"].backward()
    want, got = _grads(timm_task.trainable_module), _grads(ours.trainable_module)
    assert want.keys() == got.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=name)


WEIGHTS = [  # (distill_loss_weight, task_loss_weight): default, complementary, independent
    (None, None),
    (None, 0.3),
    (2.0, 0.5),
]


@pytest.mark.parametrize("distill_w,task_w", WEIGHTS)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_logit_task_matches_timm(teacher, batch, distill_w, task_w, temperature):
    x, labels, _ = batch
    student = _student()
    kw = dict(distill_loss_weight=distill_w, task_loss_weight=task_w, temperature=temperature, verbose=False)
    timm_task = LogitDistillationTask(student, teacher, **kw)
    ours = CachedLogitDistillationTask(copy.deepcopy(student), **kw)
    assert (ours.task_loss_weight, ours.distill_loss_weight) == (
        timm_task.task_loss_weight,
        timm_task.distill_loss_weight,
    )
    _assert_same_step(timm_task, ours, x, labels, _live_outputs(timm_task, x))


@pytest.mark.parametrize("criterion_kwargs", [None, {"soft_targets": True}], ids=["default-ce", "soft-target-ce"])
def test_logit_task_soft_targets_and_plain_tensor(teacher, batch, criterion_kwargs):
    x, _, soft = batch
    student = _student()
    kw = dict(criterion_kwargs=criterion_kwargs, task_loss_weight=0.4, temperature=2.0, verbose=False)
    timm_task = LogitDistillationTask(student, teacher, **kw)
    ours = CachedLogitDistillationTask(copy.deepcopy(student), **kw)
    # A bare tensor is taken as the logits.
    _assert_same_step(timm_task, ours, x, soft, _live_outputs(timm_task, x)["logits"])


@pytest.mark.parametrize("distill_w,task_w", WEIGHTS)
def test_feature_task_matches_timm(teacher, batch, distill_w, task_w):
    x, _, soft = batch
    student = _student()
    kw = dict(
        criterion_kwargs={"soft_targets": True}, distill_loss_weight=distill_w, task_loss_weight=task_w, verbose=False
    )
    timm_task = FeatureDistillationTask(student, teacher, **kw)
    ours = CachedFeatureDistillationTask(copy.deepcopy(student), teacher_dim=teacher.num_features, **kw)
    # The projections start from independent random draws: timm's task state (its projection) loads into ours.
    ours.load_task_state(timm_task.get_task_state())
    outputs = _live_outputs(timm_task, x)
    assert outputs["features"].shape == (B, 96)
    _assert_same_step(timm_task, ours, x, soft, outputs)
    assert ours.trainable_module.projection.weight.grad is not None


@pytest.mark.parametrize(
    "distill_type,temperature,distill_w,task_w",
    [("soft", 3.0, None, 0.5), ("soft", 1.0, 2.0, None), ("hard", 1.0, None, None)],
)
def test_token_task_matches_timm(teacher, batch, distill_type, temperature, distill_w, task_w):
    x, labels, soft = batch
    student = _deit_student()
    kw = dict(
        distill_type=distill_type,
        temperature=temperature,
        distill_loss_weight=distill_w,
        task_loss_weight=task_w,
        verbose=False,
    )
    timm_task = TokenDistillationTask(student, teacher, **kw)
    ours = CachedTokenDistillationTask(copy.deepcopy(student), **kw)
    # timm's token task reads the teacher's class logits (for the distillation head), not its tokens.
    out = _live_outputs(timm_task, x)
    _assert_same_step(
        timm_task, ours, x, labels if distill_type == "hard" else soft, {"logits": out["logits"]}, kd_key="distill_loss"
    )


def test_feature_projection_state_round_trips():
    student = _student()
    task = CachedFeatureDistillationTask(student, teacher_dim=48, verbose=False)
    projection = task.trainable_module.projection
    assert (projection.in_features, projection.out_features) == (512, 48)
    with torch.no_grad():  # as after training: unlike any fresh projection
        projection.weight.uniform_(-1, 1)
    assert task.get_eval_model() is student  # checkpoints hold the bare student, the projection goes in task state
    state = task.get_task_state()
    assert set(state) == {"projection"}

    other = CachedFeatureDistillationTask(_student(), teacher_dim=48, verbose=False)
    assert not torch.equal(other.trainable_module.projection.weight, projection.weight)
    other.load_task_state(state)
    for name, value in state["projection"].items():
        torch.testing.assert_close(other.trainable_module.projection.state_dict()[name], value, rtol=0, atol=0)

    same_width = CachedFeatureDistillationTask(_student(), teacher_dim=512, verbose=False)
    assert same_width.trainable_module.projection is None and same_width.get_task_state() == {}
    with pytest.raises(RuntimeError, match="projection"):
        same_width.load_task_state(state)


@pytest.mark.parametrize(
    "make,stored,needed",
    [
        (lambda: CachedLogitDistillationTask(_student(), verbose=False), "features", "logits"),
        (lambda: CachedFeatureDistillationTask(_student(), teacher_dim=96, verbose=False), "logits", "features"),
        (lambda: CachedTokenDistillationTask(_deit_student(), verbose=False), "tokens", "logits"),
    ],
    ids=["logit", "feature", "token"],
)
def test_missing_teacher_output_names_the_key(batch, make, stored, needed):
    x, labels, _ = batch
    task = make()
    with pytest.raises(ValueError, match=rf"'{needed}'.*needs=\['{needed}'\]") as err:
        task(x, labels, {stored: torch.zeros(B, 4)})
    assert "\n" not in str(err.value)


def test_wrong_teacher_width_is_refused_and_no_live_teacher_runs(batch):
    x, labels, _ = batch
    task = CachedFeatureDistillationTask(_student(), teacher_dim=96, verbose=False)
    with pytest.raises(ValueError, match=r"\(8, 64\)"):
        task(x, labels, {"features": torch.zeros(B, 64)})
    with pytest.raises(RuntimeError, match="no live teacher"):
        task.teacher(x)
    assert sum(p.numel() for p in task.teacher.parameters()) == 0
