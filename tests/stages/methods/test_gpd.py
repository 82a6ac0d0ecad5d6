"""GPD: the widened dynamic teacher equals the student at initialisation, holds it as a scaled slice, and
what is saved is a plain timm student; the step's losses; refusals; training from a store and from scratch."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import BATCH, STUDENT
from safetensors.torch import load_file

from stages.training.distill import train

from stages.training.settings import TrainSettings
from stages.training.batch import targets
from stages.teachers.extract import stored_plan
from stages.methods.gpd import DynamicTeacher, WideBatchNorm2d, WideConv2d
from stages.methods.losses import dkd_loss, smoothed_soft_ce
from stages.methods import MethodContext, create_method, hard_loss
from stages.data.replay import StoredViews
from stages.teachers.teacher_sources import CachedTeacher
from storage import Store, UserError

VIT = dict(
    student="deit_tiny_patch16_224", student_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
)
STUDENTS = {
    "resnet10t": STUDENT["student_kwargs"],
    "resnet18": dict(channels=(8, 16, 32, 64)),
    "resnet50": dict(channels=(8, 16, 32, 64), stem_width=16),
    "deit_tiny_patch16_224": VIT["student_kwargs"],
    "vit_small_patch14_dinov2": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),  # LayerScale
}


def student(name, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=10, **STUDENTS[name])


def images(n=8, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_the_widened_network_computes_the_students_function_at_initialisation(name):
    plain = student(name).eval()
    dynamic = DynamicTeacher(student(name), r=2).eval()
    x = images()
    with torch.no_grad():
        reference = plain(x)
        torch.testing.assert_close(dynamic.wide(x), reference, atol=1e-4, rtol=0)  # the dynamic teacher
        torch.testing.assert_close(dynamic(x), reference, atol=1e-4, rtol=0)  # the student inside it
    # Every layer but the RGB input and the class output is r x wider: about r^2 the parameters.
    n_student, n_wide = sum(p.numel() for p in plain.parameters()), sum(p.numel() for p in dynamic.parameters())
    assert 3.0 < n_wide / n_student < 4.0


def test_one_parameter_set_holds_the_student_as_a_slice_times_r():
    dynamic = DynamicTeacher(student("resnet10t"), r=2)
    wide = dict(dynamic.named_parameters())
    first, last = dynamic.net.get_submodule("conv1.0"), dynamic.net.fc
    assert isinstance(first, WideConv2d) and first.weight.shape == (48, 3, 3, 3)  # 24 -> 48 outputs, RGB stays 3
    assert last.weight.shape == (10, 128)  # 64 -> 128 inputs, 10 classes stay
    torch.optim.SGD(dynamic.parameters(), lr=0.5).zero_grad()
    with torch.no_grad():  # move the wide weights: the student must follow them
        for p in dynamic.parameters():
            p.add_(0.01 * torch.randn_like(p))
    exported = dynamic.export()
    torch.testing.assert_close(exported.get_submodule("conv1.0").weight, wide["net.conv1.0.weight"][:24] * 2)
    # 64 -> 8
    torch.testing.assert_close(exported.layer1[0].conv1.weight, wide["net.layer1.0.conv1.weight"][:8, :64] * 2)
    # the classifier's output is not widened: x 1
    torch.testing.assert_close(exported.fc.weight, wide["net.fc.weight"][:, :64])
    torch.testing.assert_close(exported.fc.bias, wide["net.fc.bias"])
    torch.testing.assert_close(exported.layer1[0].bn1.weight, wide["net.layer1.0.bn1.weight"][:8])
    assert not any(isinstance(m, (WideConv2d, WideBatchNorm2d)) for m in exported.modules())
    # The student keeps its own BatchNorm statistics: a training-mode pass of each network moves its own.
    dynamic.train()
    bn = dynamic.net.layer1[0].bn1
    before = (bn.running_mean.clone(), bn.student_mean.clone())
    dynamic.wide(images())
    assert not torch.equal(bn.running_mean, before[0]) and torch.equal(bn.student_mean, before[1])
    dynamic(images())
    assert not torch.equal(bn.student_mean, before[1])
    torch.testing.assert_close(dynamic.export().layer1[0].bn1.running_mean, bn.student_mean)


def test_the_vit_student_inside_takes_its_token_parameters_as_slices_times_r():
    dynamic = DynamicTeacher(student("deit_tiny_patch16_224"), r=2)
    assert dynamic.net.cls_token.shape == (1, 1, 64) and dynamic.net.pos_embed.shape == (1, 17, 64)
    with torch.no_grad():
        dynamic.net.pos_embed.add_(0.1 * torch.randn_like(dynamic.net.pos_embed))
    exported = dynamic.export().eval()
    torch.testing.assert_close(exported.pos_embed, dynamic.net.pos_embed[..., :32] * 2)
    dynamic.eval()
    with torch.no_grad():
        torch.testing.assert_close(dynamic(images()), exported(images()))


def test_gradients_reach_the_shared_weights_from_both_networks():
    dynamic = DynamicTeacher(student("resnet10t"), r=2)
    conv = dynamic.net.layer1[0].conv1
    dynamic.wide(images()).sum().backward()
    wide_grad = conv.weight.grad.clone()
    assert wide_grad[8:].abs().sum() > 0  # rows outside the student's (8, 64) slice learn from the wide network only
    conv.weight.grad = None
    dynamic(images()).sum().backward()
    assert (
        conv.weight.grad[:8, :64].abs().sum() > 0
        and conv.weight.grad[8:].abs().sum() == 0
        and conv.weight.grad[:, 64:].abs().sum() == 0
    )


def test_unsupported_students_are_refused_in_one_line_naming_the_supported_ones():
    for name, kwargs in [("mobilenetv3_small_050", {}), ("convnext_atto", {}), ("efficientnet_b0", {})]:
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        with pytest.raises(UserError, match="gpd supports timm ResNets") as e:
            DynamicTeacher(model)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="depthwise"):
        # a ResNet with grouped convolutions
        DynamicTeacher(timm.create_model("resnext50_32x4d", pretrained=False, num_classes=10))
    with pytest.raises(UserError, match="ratio"):
        DynamicTeacher(student("resnet10t"), r=1)


# -- the step --------------------------------------------------------------------------------


def _method(**kwargs):
    return create_method("gpd", MethodContext(num_classes=10, student_dim=64, teacher_dim=None), **kwargs)


def _logits(seed):
    return torch.randn(8, 10, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def test_the_step_is_l_d_plus_l_s_with_the_dynamic_teacher_detached_in_sce():
    method = _method()
    z_s, z_d, t = _logits(1), _logits(2), _logits(3).detach()
    y = targets(np.arange(8) % 10, 10, 0.0)
    loss, parts = method({"logits": z_s, "wide_logits": z_d}, {"logits": t}, y)
    target = y.classes(t)
    ce = lambda z: hard_loss("ce", z, y)  # noqa: E731
    expected = (
        ce(z_d)
        + dkd_loss(z_d, t, target, 1.0, 0.5)
        + ce(z_s)
        + dkd_loss(z_s, t, target, 1.0, 0.5)
        + 3.0 * smoothed_soft_ce(z_s, torch.softmax(z_d, 1), 0.1)
    )
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"ce", "wide_ce", "dkd", "wide_dkd", "sce"}
    # SCE trains only the student: with the label and DKD terms off, nothing flows to the dynamic teacher.
    sce_only = _method(ce_weight=0.0, alpha=0.0, beta=0.0)
    z_d.grad = None
    sce_only({"logits": z_s, "wide_logits": z_d}, {"logits": t}, y)[0].backward()
    assert z_d.grad is None or z_d.grad.abs().sum() == 0
    assert z_s.grad.abs().sum() > 0


def test_without_a_teacher_it_is_ce_plus_ce_plus_three_sce():
    method = _method()
    z_s, z_d = _logits(4), _logits(5)
    y = targets(np.arange(8) % 10, 10, 0.0)
    loss, parts = method({"logits": z_s, "wide_logits": z_d}, {}, y)
    expected = (
        hard_loss("ce", z_d, y) + hard_loss("ce", z_s, y) + 3.0 * smoothed_soft_ce(z_s, torch.softmax(z_d.detach(), 1))
    )
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"ce", "wide_ce", "sce"}


def test_one_backward_of_the_sum_equals_the_official_two_backwards():
    method = _method()
    y = targets(np.arange(8) % 10, 10, 0.0)
    t = _logits(6).detach()
    x = images()

    def grads(two_passes: bool):
        dynamic = DynamicTeacher(student("resnet10t"), r=2)
        torch.manual_seed(0)
        wide = dynamic.wide(x)
        if two_passes:  # L_D backward, then the student's forward and L_S backward
            target = y.classes(t)
            (hard_loss("ce", wide, y) + dkd_loss(wide, t, target, 1.0, 0.5)).backward()
            z_s = dynamic(x)
            (
                hard_loss("ce", z_s, y)
                + dkd_loss(z_s, t, target, 1.0, 0.5)
                + 3 * smoothed_soft_ce(z_s, torch.softmax(wide.detach(), 1))
            ).backward()
        else:
            method({"logits": dynamic(x), "wide_logits": wide}, {"logits": t}, y)[0].backward()
        return [p.grad.clone() for p in dynamic.parameters()]

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# -- training ----------------------------------------------------------------------------------


def test_gpd_trains_from_a_store_and_saves_a_plain_timm_student(base_store, train_data, val_data, tmp_path):
    store = Store(base_store)
    plan = stored_plan(store)
    settings = TrainSettings(**STUDENT, method="gpd", epochs=1, batch_size=BATCH, size=32, clip_grad=5.0, model_ema=0.9)
    result = train(
        settings,
        train_data,
        val_data,
        StoredViews(store, plan),
        plan,
        CachedTeacher(store, "t1", ("logits",)),
        out_dir=tmp_path,
    )
    line = result.metrics[0]
    assert {"train_ce", "train_wide_ce", "train_dkd", "train_wide_dkd", "train_sce", "val_top1", "val_top1_ema"} <= set(
        line
    )
    assert all(np.isfinite(v) for v in line.values())
    plain = timm.create_model(STUDENT["student"], pretrained=False, num_classes=10, **STUDENT["student_kwargs"])
    plain.load_state_dict(load_file(tmp_path / "ema" / "model.safetensors"))  # the EMA's student, exported the same way
    # strict: exactly the student's keys and shapes, no GPD code
    plain.load_state_dict(load_file(tmp_path / "student.safetensors"))
    for folder in (tmp_path, tmp_path / "ema"):  # timm's own loader builds the plain student from each folder
        assert (
            timm.create_model(f"local-dir:{folder}", pretrained=True).default_cfg["architecture"] == STUDENT["student"]
        )
    plain.eval()
    result.model.eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), result.model(x))  # what was saved is the student that was evaluated


def test_gpd_trains_from_scratch_without_a_teacher(base_store, train_data):
    store = Store(base_store)
    plan = stored_plan(store)
    settings = TrainSettings(**STUDENT, method="gpd", epochs=1, batch_size=BATCH, size=32)
    line = train(settings, train_data, None, StoredViews(store, plan), plan, None).metrics[0]
    assert {"train_ce", "train_wide_ce", "train_sce"} <= set(line) and "train_dkd" not in line


def test_a_resnet_without_gpd_support_is_refused_before_training(base_store, train_data):
    store = Store(base_store)
    plan = stored_plan(store)
    settings = TrainSettings(student="mobilenetv3_small_050", method="gpd", epochs=1, batch_size=BATCH, size=32)
    with pytest.raises(UserError, match="cannot widen student mobilenetv3_small_050"):
        train(settings, train_data, None, StoredViews(store, plan), plan, CachedTeacher(store, "t1", ("logits",)))


def _ddp_worker(rank, world, port, store_path, out):
    import torch.distributed as dist

    from stages.data.datasets import open_dataset

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        store = Store(store_path)
        plan = stored_plan(store)
        settings = TrainSettings(**STUDENT, method="gpd", epochs=1, batch_size=16, size=32, clip_grad=5.0)
        result = train(
            settings,
            open_dataset(store.record.dataset.source),
            None,
            StoredViews(store, plan),
            plan,
            CachedTeacher(store, "t1", ("logits",)),
        )
        torch.save({"metrics": result.metrics, "weights": result.model.state_dict()}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_gpd_trains_under_ddp_with_the_replicas_equal(base_store, tmp_path):
    """Both networks run inside the one DDP-wrapped forward, so each step is one forward and one backward for DDP."""
    import torch.multiprocessing as mp
    from conftest import free_port

    mp.spawn(_ddp_worker, args=(2, free_port(), str(base_store), str(tmp_path / "rank")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank.{r}", weights_only=False) for r in (0, 1)]
    losses = [{k: v for k, v in r["metrics"][0].items() if k.startswith("train_")} for r in ranks]
    assert losses[0] == losses[1] and np.isfinite(losses[0]["train_sce"])  # reduced over both ranks
    a, b = ranks[0]["weights"], ranks[1]["weights"]
    assert a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) for k in a if "running" not in k and "student_" not in k
    )


def test_pipeline_train_runs_gpd_from_scratch_and_distill_refuses_an_unsupported_student(base_store, tmp_path, capsys):
    from pipeline.cli import main

    argv = [
        "--quiet",
        "train",
        "--data",
        "fake:64?size=32",
        "--model",
        "resnet10t",
        "--model-arg",
        "channels=[8,16,32,64]",
        "--method",
        "gpd",
    ]
    assert main([*argv, "--epochs", "1", "--batch-size", "32", "--size", "32", "--out", str(tmp_path / "scratch")]) == 0
    plain = timm.create_model("resnet10t", pretrained=False, num_classes=10, channels=(8, 16, 32, 64))
    plain.load_state_dict(load_file(tmp_path / "scratch" / "model.safetensors"))
    capsys.readouterr()
    argv = [
        "--quiet",
        "distill",
        "--from-cache",
        str(base_store),
        "--method",
        "gpd",
        "--student",
        "mobilenetv3_small_050",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "cannot widen student mobilenetv3_small_050" in err and "gpd supports timm ResNets" in err and "\n" not in err
    )
