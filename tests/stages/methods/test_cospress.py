"""CosPress: what trains what, the global loss over every worker's batch, the refusals, and a cached token store
training the same student as the live teacher."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
import torch.multiprocessing as mp
from conftest import BATCH, BLOCK, free_port

from stages.cache import teacher_rows
from stages.training.distill import train
from stages.training.settings import TrainSettings
from stages.training.batch import targets
from stages.teachers.extract import TeacherRunner, extract, teacher_info
from stages.methods.losses import flat_cosine_loss, similarity_kl
from stages.methods import MethodContext, create_method, method_class, method_context
from stages.data.replay import StoredViews
from stages.cache.store_setup import open_store, stored_plan
from stages.teachers.teacher_sources import CachedTeacher, LiveTeacher
from stages.teachers.teachers import IMAGENET_MEAN, IMAGENET_STD, TeacherSpec, build_teacher, register_teacher
from storage import UserError

# A DINOv2-shaped teacher small enough for two cores: patch 8 at 32 px, 1 CLS + 4 x 4 patches of 48.
register_teacher(
    TeacherSpec(
        "test_dinov2",
        "vit_small_patch14_dinov2",
        32,
        IMAGENET_MEAN,
        IMAGENET_STD,
        outputs=("features",),
        kwargs=dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3),
    )
)
VIT = dict(
    student="vit_tiny_patch16_224", student_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
)
T, DT, DS = 17, 48, 32


def vit_student(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(VIT["student"], pretrained=False, num_classes=10, **{**VIT["student_kwargs"], **kwargs})


def context(**kw):
    base = dict(
        num_classes=10,
        student_dim=DS,
        teacher_dim=DT,
        student_tokens=(T, DS),
        teacher_tokens=(T, DT),
        teacher_token_prefix=1,
        student_token_prefix=1,
        size=32,
    )
    return MethodContext(**{**base, **kw})


def tokens(b=6, t=T, d=DT, seed=0):
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed))


def test_the_mapping_head_is_layernorm_then_linear_on_the_teacher_side():
    method = create_method("cospress", context())
    assert [type(m) for m in method.map] == [torch.nn.LayerNorm, torch.nn.Linear]
    assert method.map[0].normalized_shape == (DT,) and (method.map[1].in_features, method.map[1].out_features) == (
        DT,
        DS,
    )
    assert method.temperatures == pytest.approx([0.01 * i for i in range(1, 11)])


def test_similarity_losses_train_only_the_head_and_student_losses_only_the_student():
    y = targets(np.arange(6) % 10, 10, 0.0)
    t = tokens()
    s = tokens(d=DS, seed=1).requires_grad_()
    student = {"tokens": s, "features": s[:, 0], "logits": torch.zeros(6, 10)}
    only_similarity = create_method("cospress", context(), token_weight=0.0, cls_weight=0.0, probe_weight=0.0)
    loss, parts = only_similarity(student, {"tokens": t}, y)
    loss.backward()
    assert s.grad is None or s.grad.abs().sum() == 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in only_similarity.map.parameters())
    # The student terms chase the detached mapped tokens: one cosine over all tokens, one on the CLS token.
    only_student = create_method("cospress", context(), local_weight=0.0, global_weight=0.0, probe_weight=0.0)
    loss, parts = only_student(student, {"tokens": t}, y)
    loss.backward()
    assert (
        all(p.grad is None or p.grad.abs().sum() == 0 for p in only_student.map.parameters()) and s.grad.abs().sum() > 0
    )
    with torch.no_grad():
        mapped = only_student.map(t)
    assert parts["tokens"].item() == pytest.approx(flat_cosine_loss(s, mapped).item(), rel=1e-6)
    assert parts["cls"].item() == pytest.approx(flat_cosine_loss(s[:, 0], mapped[:, 0]).item(), rel=1e-6)
    assert parts["local"].item() == pytest.approx(similarity_kl(t, mapped, only_student.temperatures).item(), rel=1e-5)
    assert parts["global"].item() == pytest.approx(
        similarity_kl(t[None, :, 0], mapped[None, :, 0], only_student.temperatures).item(), rel=1e-5
    )
    assert loss.item() == pytest.approx(parts["tokens"].item() + parts["cls"].item(), rel=1e-6)


def test_the_probe_trains_the_classifier_and_never_the_backbone():
    model = vit_student()
    method = create_method("cospress", context())
    out = method.student_outputs(method.wrap_student(model), torch.randn(4, 3, 32, 32))
    assert out["tokens"].shape == (4, T, DS) and out["features"].shape == (4, DS)
    torch.nn.functional.cross_entropy(out["logits"], torch.arange(4)).backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head."))


def test_the_student_tokens_are_cls_then_patches_after_the_final_norm():
    model = vit_student(reg_tokens=2).eval()
    x = torch.randn(2, 3, 32, 32)
    out = create_method("cospress", context()).student_outputs(model, x)
    f = model.forward_features(x)  # (B, 1 + 2 + 16, D), after model.norm
    torch.testing.assert_close(out["tokens"], torch.cat([f[:, :1], f[:, 3:]], 1))


def test_refusals_say_what_to_change_in_one_line(base_store):
    with pytest.raises(
        UserError, match=r"17 tokens at 32 px \(4x4 patches\), the teacher's cache holds 50 \(7x7 patches\).*patch_size"
    ) as e:
        create_method("cospress", context(teacher_tokens=(50, DT)))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="CLS token"):
        create_method("cospress", context(teacher_token_prefix=0))
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=10)  # 1 token at 32 px, and no CLS token
    with pytest.raises(UserError, match="ViT student with a CLS token"):  # said before the grid, which a CNN cannot fix
        student_side = method_context(method_class("cospress"), cnn, None, num_classes=10, size=32, epochs=1)
        create_method(
            "cospress",
            dataclasses.replace(student_side, teacher_dim=DT, teacher_tokens=(T, DT), teacher_token_prefix=1),
        )
    with pytest.raises(UserError, match="--outputs logits,features,tokens"):
        CachedTeacher(__import__("storage").Store(base_store), "t1", ("tokens",))


def test_the_cli_refuses_cospress_on_a_store_without_tokens(base_store, tmp_path, capsys):
    from pipeline.cli import main

    argv = ["--quiet", "distill", "--from-cache", str(base_store), "--method", "cospress", "--out", str(tmp_path / "o")]
    argv += ["--student", VIT["student"], "--epochs", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "has no tokens" in err and "--outputs logits,features,tokens" in err and "\n" not in err


# -- the global loss under DDP: every worker's CLS tokens, gathered differentiably ---------------


def _global_worker(rank, world, port, teacher, state, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        method = create_method(
            "cospress", context(), local_weight=0.0, token_weight=0.0, cls_weight=0.0, probe_weight=0.0
        )
        method.load_state_dict(state)
        rows = teacher.chunk(world)[rank]
        student = {
            "tokens": torch.zeros(len(rows), T, DS),
            "features": torch.zeros(len(rows), DS),
            "logits": torch.zeros(len(rows), 10),
        }
        loss, _ = method(student, {"tokens": rows}, targets(np.zeros(len(rows), int), 10, 0.0))
        loss.backward()
        grads = [p.grad.clone() for p in method.parameters()]
        for g in grads:  # what DDP does: the mean over workers
            dist.all_reduce(g)
            g /= world
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def test_the_global_loss_under_ddp_is_the_single_process_loss_of_the_whole_batch(tmp_path):
    teacher = tokens(b=8, seed=3)
    method = create_method("cospress", context(), local_weight=0.0, token_weight=0.0, cls_weight=0.0, probe_weight=0.0)
    student = {"tokens": torch.zeros(8, T, DS), "features": torch.zeros(8, DS), "logits": torch.zeros(8, 10)}
    loss, _ = method(student, {"tokens": teacher}, targets(np.zeros(8, int), 10, 0.0))
    loss.backward()
    mp.spawn(
        _global_worker, args=(2, free_port(), teacher, method.state_dict(), tmp_path / "rank0.pt"), nprocs=2, join=True
    )
    got = torch.load(tmp_path / "rank0.pt")
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)  # each worker's value is the whole batch's
    for a, p in zip(got["grads"], method.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


# -- training from a token store -----------------------------------------------------------------


@pytest.fixture(scope="module")
def token_store(tmp_path_factory, train_data, plan):
    """The DINOv2-shaped test teacher's float32 features and tokens over 2 views."""
    teacher = build_teacher("test_dinov2", random_init=True, num_classes=10, input_size=32)
    path = tmp_path_factory.mktemp("tokens") / "store"
    store = open_store(path, train_data, plan, views=2, block=BLOCK, size=32)
    info = teacher_info(teacher, teacher_rows.output_info(teacher, outputs=("features", "tokens"), dtype="float32"))
    extract(store, train_data, TeacherRunner(teacher, info), "vit", views=2, batch_size=BATCH)
    return store, teacher


def test_cached_tokens_train_the_same_student_as_the_live_teacher_bit_for_bit(token_store, train_data, val_data, plan):
    store, teacher = token_store
    views = StoredViews(store, stored_plan(store))
    settings = TrainSettings(**VIT, method="cospress", epochs=1, batch_size=16, size=32)
    cached = train(settings, train_data, val_data, views, plan, CachedTeacher(store, "vit", ("tokens",)))
    live = train(settings, train_data, val_data, views, plan, LiveTeacher(teacher, ("tokens",)))
    line = cached.metrics[0]
    assert {"train_local", "train_global", "train_tokens", "train_cls", "train_probe", "val_top1"} <= set(line)
    assert all(np.isfinite(v) for v in line.values())
    a, b = cached.model.state_dict(), live.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_student_whose_grid_differs_from_the_caches_is_refused_before_training(token_store, train_data, plan):
    store, _ = token_store
    views = StoredViews(store, stored_plan(store))
    settings = TrainSettings(
        student=VIT["student"],
        student_kwargs={**VIT["student_kwargs"], "patch_size": 16},
        method="cospress",
        epochs=1,
        batch_size=16,
        size=32,
    )
    with pytest.raises(UserError, match="token grid does not match"):
        train(settings, train_data, None, views, plan, CachedTeacher(store, "vit", ("tokens",)))
