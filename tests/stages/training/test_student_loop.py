"""The student's step at GPU speed, checked on CPU: autocast, fp16 refusal, clipping, EMA, channels_last, compile."""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
from conftest import BATCH, STUDENT
from safetensors.torch import load_file

from pipeline import cli
from stages.training.distill import EpochHooks, train
from stages.training.settings import TrainSettings
from stages.cache.store_setup import stored_plan
from stages.training.student import build_student
from stages.teachers.teacher_sources import CachedTeacher, LiveTeacher
from stages.data.replay import StoredViews
from storage import Store, UserError


def _settings(**kw) -> TrainSettings:
    return TrainSettings(**{**STUDENT, "method": "kd", "epochs": 1, "batch_size": BATCH, "verify": "all", **kw})


def _run(base_store, train_data, val_data=None, teacher=None, **kw):
    store = Store(base_store)
    views = StoredViews(store, stored_plan(store))
    teacher = teacher or CachedTeacher(store, "t1", ("logits",))
    return train(_settings(**kw), train_data, val_data, views, views.plan, teacher)


def _max_change(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def test_bf16_autocast_trains_on_cpu_and_differs_from_float32(base_store, train_data, val_data):
    fp32 = _run(base_store, train_data, val_data)
    bf16 = _run(base_store, train_data, val_data, amp="bf16")
    assert all(torch.isfinite(torch.tensor(v)) for k, v in bf16.metrics[0].items() if k.startswith("train_"))
    assert 0 < _max_change(fp32.model.state_dict(), bf16.model.state_dict())  # it really ran in bfloat16
    # ...and still learned the same thing, roughly: the same loss to bfloat16's precision.
    assert bf16.metrics[0]["train_loss"] == pytest.approx(fp32.metrics[0]["train_loss"], rel=0.05)


def test_online_teacher_runs_under_autocast(base_store, train_data, teacher1):
    result = _run(base_store, train_data, teacher=LiveTeacher(teacher1, ("logits",)), amp="bf16")
    assert torch.isfinite(torch.tensor(result.metrics[0]["train_kd"]))


def test_fp16_on_a_cpu_is_one_line(base_store, tmp_path, capsys):
    code = cli.main(
        [
            "distill",
            "--from-cache",
            str(base_store),
            "--student",
            "resnet10t",
            "--amp",
            "fp16",
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--amp fp16 needs a CUDA device" in err[0]
    with pytest.raises(UserError, match="needs a CUDA device"):
        _run(base_store, train_data=None, amp="fp16")


def test_clipping_bounds_each_step(base_store, train_data):
    # Plain SGD moves each weight by lr * its gradient, so a clipped norm of 1e-6 bounds the whole epoch's change.
    sgd = dict(optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=0.1, schedule="step")
    weights = lambda model: {k: v.detach() for k, v in model.named_parameters()}  # noqa: E731 (BatchNorm's statistics move without gradients)
    init = weights(build_student(STUDENT["student"], 10, 0, **STUDENT["student_kwargs"]))
    clipped = _run(base_store, train_data, clip_grad=1e-6, **sgd)
    free = _run(base_store, train_data, **sgd)
    steps = 80 // BATCH
    assert _max_change(init, weights(clipped.model)) <= 0.1 * 1e-6 * steps * 1.01
    assert _max_change(init, weights(free.model)) > 1e-3


def test_model_ema_is_evaluated_saved_and_follows_its_decay(base_store, train_data, val_data, tmp_path):
    store = Store(base_store)
    views = StoredViews(store, stored_plan(store))
    cached = CachedTeacher(store, "t1", ("logits",))
    out = tmp_path / "run"
    result = train(_settings(model_ema=0.5, epochs=2), train_data, val_data, views, views.plan, cached, out_dir=out)
    assert {"val_top1", "val_top1_ema"} <= set(result.metrics[-1])
    student, ema = load_file(out / "student.safetensors"), load_file(out / "ema" / "model.safetensors")
    assert student.keys() == ema.keys() and _max_change(student, ema) > 0
    # Both folders are timm model folders: timm's own loader builds each trained model with its input settings.
    for folder, weights in ((out, student), (out / "ema", ema)):
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        assert _max_change(weights, model.state_dict()) == 0 and model.num_classes == 10
        cfg = model.pretrained_cfg
        assert tuple(cfg["input_size"]) == (3, 32, 32) and cfg["crop_pct"] == views.plan.recipe.eval_crop
        assert cfg["label_names"] == list(train_data.classes) and tuple(cfg["mean"]) == tuple(
            result.model.pretrained_cfg["mean"]
        )
    # Decay 0 copies the student after every step: the EMA is the student.
    copy_ = train(_settings(model_ema=0.0), train_data, None, views, views.plan, cached, out_dir=tmp_path / "zero")
    assert _max_change(load_file(tmp_path / "zero" / "ema" / "model.safetensors"), copy_.model.state_dict()) == 0


def test_a_resumed_run_with_ema_from_a_pickle_free_checkpoint_equals_the_uninterrupted_one(base_store, train_data):
    store = Store(base_store)
    views = StoredViews(store, stored_plan(store))
    cached = CachedTeacher(store, "t1", ("logits",))
    saved = {}
    hooks = EpochHooks(save=lambda state, line: saved.setdefault(line["epoch"], copy.deepcopy(state)))
    whole = train(_settings(model_ema=0.9, epochs=2), train_data, None, views, views.plan, cached, hooks=hooks)
    # A checkpoint holds tensors and plain values only: it loads without unpickling any object.
    buffer = io.BytesIO()
    torch.save(saved[1], buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = train(
        _settings(model_ema=0.9, epochs=2), train_data, None, views, views.plan, cached, hooks=EpochHooks(state=state)
    )
    assert _max_change(whole.model.state_dict(), resumed.model.state_dict()) == 0
    assert "ema" in saved[2] and "scaler" in saved[2]


def test_channels_last_trains_the_same_student_to_rounding(base_store, train_data):
    plain = _run(base_store, train_data)
    nhwc = _run(base_store, train_data, channels_last=True)
    assert nhwc.metrics[0]["train_loss"] == pytest.approx(plain.metrics[0]["train_loss"], rel=1e-3)
    conv = next(p for p in nhwc.model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)


def test_loss_parts_stay_on_the_device_until_the_epoch_ends(base_store, train_data):
    # Reading a loss with .item() every step stalls a GPU; the parts a method returns are tensors, read once an epoch.
    from stages.methods import MethodContext, Targets, create_method

    method = create_method(
        "kd", MethodContext(num_classes=10, student_dim=8, teacher_dim=None, class_means=None, epochs=1)
    )
    logits = torch.randn(4, 10, requires_grad=True)
    _, parts = method({"logits": logits}, {"logits": torch.randn(4, 10)}, Targets(torch.arange(4), torch.eye(10)[:4]))
    assert parts and all(isinstance(v, torch.Tensor) and not v.requires_grad for v in parts.values())


@pytest.mark.slow
def test_compiled_student_trains_like_the_eager_one(base_store, train_data):
    eager = _run(base_store, train_data)
    compiled = _run(base_store, train_data, compile=True)
    assert compiled.metrics[0]["train_loss"] == pytest.approx(eager.metrics[0]["train_loss"], rel=1e-3)
