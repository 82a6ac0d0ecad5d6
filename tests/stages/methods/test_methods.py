"""Methods as the trainer uses them: what they read, how their parts add up, what trains, and the schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import BATCH, STUDENT, VIEWS, make_record

from stages.cache import stats
from stages.training.distill import lr_factor, train
from stages.training.settings import TrainSettings
from stages.training.batch import targets
from stages.teachers.teacher_sources import CachedTeacher, TeacherSource
from stages.methods.losses import kd_loss, logsum_loss
from stages.methods import MethodContext, Targets, create_method, hard_loss, list_methods, method_class, method_context
from stages.data.replay import StoredViews
from stages.cache.store_setup import stored_plan
from storage import Store, UserError

C, DS, DT, B = 10, 64, 512, 8
T = 17  # tokens of the test ViT (below): CLS + 4 x 4 patches at 32 px
VIT = dict(
    student="vit_tiny_patch16_224", student_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
)


def context(**kw):
    torch.manual_seed(0)
    return MethodContext(num_classes=C, student_dim=DS, teacher_dim=DT, class_means=torch.randn(C, DT), epochs=10, **kw)


def batch(labels=None):
    torch.manual_seed(1)
    student = {"logits": torch.randn(B, C, requires_grad=True), "features": torch.randn(B, DS, requires_grad=True)}
    teacher = {"logits": torch.randn(B, C), "features": torch.randn(B, DT)}
    labels = np.arange(B) % C if labels is None else np.asarray(labels)
    return student, teacher, targets(labels, C, 0.0)


class ShapesOnly(TeacherSource):
    """A teacher that has every output, for building any method: C classes, D_T-wide features and T tokens."""

    needs = ("logits", "features", "tokens")
    feature_dim, token_shape, token_prefix = DT, (T, DT), 1

    def class_means(self):
        return torch.randn(C, DT, generator=torch.Generator().manual_seed(3))

    def outputs(self, batch, views, temperature=1.0):
        g = torch.Generator().manual_seed(4)
        return {
            "logits": torch.randn(B, C, generator=g),
            "features": torch.randn(B, DT, generator=g),
            "tokens": torch.randn(B, T, DT, generator=g),
        }


def vit_student():
    """A student every method can train: a tiny ViT with pooled features, CLS + 4 x 4 patch tokens and a classifier."""
    torch.manual_seed(0)
    return timm.create_model(VIT["student"], pretrained=False, num_classes=C, **VIT["student_kwargs"])


@pytest.mark.parametrize("name", list_methods())
def test_every_method_trains_what_it_owns(name):
    """Through the interface the trainer uses: context, wrap_student, student_outputs, forward, export_student."""
    cls = method_class(name)
    teacher = ShapesOnly()
    model = vit_student()
    method = create_method(name, method_context(cls, model, teacher, num_classes=C, size=32, epochs=10))
    method.train()
    trained = method.wrap_student(model)
    x = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    t_out = {k: v for k, v in teacher.outputs(None, None).items() if k in cls.needs}
    y = targets(np.arange(B) % C, C, 0.0)

    def loss_now():
        torch.manual_seed(2)  # the same dropout mask (kdpp's projector) in every call
        out = method.student_outputs(trained, x)
        assert set(cls.student_needs) <= set(out), f"{name} declares {cls.student_needs}"
        return method(out, t_out, y)

    loss, parts = loss_now()
    loss.backward()
    assert loss.ndim == 0 and math.isfinite(loss.item()) and all(math.isfinite(float(v)) for v in parts.values())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained.parameters())  # the student learns
    # what the trainer hands its optimiser beside the student's
    owned = [p for p in method.parameters() if p.requires_grad]
    if name in ("kdpp", "srd", "cospress"):
        assert owned, "its projector or mapping (student width 32 <-> teacher width 48 here) is the method's own"
    # what a method owns learns with the student: it has gradients, and a small step on it alone lowers its loss
    if owned:
        assert all(p.grad is not None for p in owned) and any(p.grad.abs().sum() > 0 for p in owned)
        # CosPress's mapping learns from its similarity terms only (the student chases it detached).
        own_loss = (lambda p: p["local"] + p["global"]) if name == "cospress" else (lambda p: None)
        before = own_loss(parts) if name == "cospress" else loss
        torch.nn.utils.clip_grad_norm_(owned, 1.0)
        torch.optim.SGD(owned, lr=1e-3).step()
        with torch.no_grad():
            after_loss, after_parts = loss_now()
            after = own_loss(after_parts) if name == "cospress" else after_loss
            assert after.item() < before.item()
    # What is saved is the plain timm student: it loads into the model the student was built as.
    plain = timm.create_model(VIT["student"], pretrained=False, num_classes=C, **VIT["student_kwargs"])
    plain.load_state_dict(method.export_student(trained).state_dict())


def test_methods_declare_what_they_read():
    assert method_class("ce").needs == ()
    assert method_class("kd").needs == method_class("dkd").needs == method_class("dist").needs == ("logits",)
    assert method_class("kdpp").needs == method_class("srd").needs == ("logits", "features")
    assert method_class("cospress").needs == ("tokens",) and method_class("cospress").student_needs == (
        "features",
        "tokens",
    )
    assert method_class("gpd").needs == ("logits",) and not method_class("gpd").requires_teacher  # also from scratch
    assert all(method_class(m).requires_teacher for m in list_methods() if m not in ("ce", "gpd"))


@pytest.mark.parametrize("name", [m for m in list_methods() if method_class(m).needs])
def test_a_store_without_an_output_a_method_reads_is_refused_with_the_extract_flags(name):
    """Before any work: the cached teacher is refused when it is opened, naming the --outputs that add what is missing."""
    from stages.cache import teacher_rows

    needs = method_class(name).needs
    for missing in needs:
        stored = tuple(o for o in ("logits", "features", "tokens") if o != missing)
        record = make_record(outputs=stored, num_tokens=T, token_dim=DT, token_prefix=1)
        with pytest.raises(UserError, match=f"has no {missing} .*--outputs {','.join([*stored, missing])}"):
            teacher_rows.stored_names(record, needs)


def test_hard_losses_on_labelled_rows_only():
    s = torch.randn(6, C)
    labels = np.array([3, -1, 0, 9, -1, 2])
    y = targets(labels, C, 0.0)
    kept = torch.tensor([0, 2, 3, 5])
    assert hard_loss("ce", s, y).item() == pytest.approx(
        F.cross_entropy(s[kept], torch.tensor([3, 0, 9, 2])).item(), rel=1e-6
    )
    one_hot = F.one_hot(torch.tensor([3, 0, 9, 2]), C).float()
    assert hard_loss("bce", s, y).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(s[kept], one_hot).item(), rel=1e-6
    )
    smoothed = targets(labels, C, 0.1)
    assert smoothed.soft[0, 3].item() == pytest.approx(0.91) and smoothed.soft[0, 0].item() == pytest.approx(0.01)
    assert smoothed.soft[1].sum() == 0  # unlabelled rows carry no target
    nothing = targets(np.full(6, -1), C, 0.0)
    assert hard_loss("ce", s.requires_grad_(), nothing).item() == 0.0


def test_unlabelled_rows_take_the_teachers_class():
    y = Targets(torch.tensor([2, -1]), torch.tensor([[0.2, 0.1, 0.7], [0.0, 0.0, 0.0]]))
    assert y.classes(torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])).tolist() == [2, 1]


def test_kdpp_ramps_its_kd_weight_and_projects_only_when_widths_differ():
    method = create_method("kdpp", context(), alpha=4.0, beta=2.0, warmup_epochs=5)
    method.eval()  # dropout off, so two calls agree
    student, teacher, y = batch()
    method.epoch = 0
    at0, parts0 = method(student, teacher, y)
    assert at0.item() == pytest.approx((parts0["ce"] + 2.0 * parts0["nd"]).item(), rel=1e-6)
    method.epoch = 2
    at2, parts2 = method(student, teacher, y)
    assert at2.item() == pytest.approx((parts2["ce"] + 4.0 * 0.4 * parts2["kd"] + 2.0 * parts2["nd"]).item(), rel=1e-6)
    same = create_method("kdpp", MethodContext(C, DT, DT, torch.randn(C, DT)))
    assert isinstance(same.project, torch.nn.Identity) and not isinstance(method.project, torch.nn.Identity)


def test_srd_adds_its_parts_as_the_recipe_says():
    method = create_method("srd", context())
    method.train()
    student, teacher, y = batch()
    total, parts = method(student, teacher, y)
    assert total.item() == pytest.approx((parts["ce"] + 2.0 * parts["rep"] + parts["kd"]).item(), rel=1e-6)
    ns = method.project(student["features"])
    assert ns.mean(0).abs().max() < 1e-5  # batch-normalised without affine
    assert parts["kd"].item() == pytest.approx(kd_loss(student["logits"], teacher["logits"]).item(), rel=1e-6)
    assert parts["rep"].item() == pytest.approx(
        logsum_loss(ns, method.teacher_norm(teacher["features"])).item(), rel=1e-5
    )


def test_learning_rate_schedules():
    step = TrainSettings(epochs=100, schedule="step", lr_milestones=[30, 60, 90], lr_gamma=0.1)
    f = lr_factor(step, steps_per_epoch=10)
    assert [f(0), f(299), f(300), f(600), f(999)] == pytest.approx([1.0, 1.0, 0.1, 0.01, 0.001])
    cosine = lr_factor(TrainSettings(epochs=10, warmup_epochs=1), steps_per_epoch=10)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0) and cosine(10) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)
    with pytest.raises(UserError, match="schedule"):
        lr_factor(TrainSettings(schedule="linear"), 10)


def test_class_means_are_the_per_class_mean_of_every_stored_feature(store_copy, train_data):
    store = Store(store_copy)
    arrays = stats.write_stats(store, "t1", train_data.labels)
    group = store.teacher("t1")
    feats = np.concatenate([group.array("features")[v] for v in range(VIEWS)]).astype(np.float64)  # (V*N, D)
    labels = np.tile(train_data.labels[store.order], VIEWS)  # the rows are in the store's order
    for c in (0, 7):
        np.testing.assert_allclose(arrays["class_means"][c], feats[labels == c].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(arrays["feature_cov"], np.cov(feats.T, bias=True), rtol=1e-4, atol=1e-5)
    assert torch.equal(stats.class_means(store, "t1"), torch.from_numpy(arrays["class_means"]))


def test_kdpp_trains_from_a_store_once_its_statistics_exist(store_copy, train_data):
    store = Store(store_copy)
    plan = stored_plan(store)
    settings = TrainSettings(
        **STUDENT, method="kdpp", method_args={"warmup_epochs": 1}, epochs=1, batch_size=BATCH, size=32
    )
    views = StoredViews(store, plan)
    with pytest.raises(UserError, match="pipeline stats"):
        train(settings, train_data, None, views, plan, CachedTeacher(store, "t1", ("logits", "features")))
    stats.write_stats(store, "t1", train_data.labels)
    result = train(settings, train_data, None, views, plan, CachedTeacher(store, "t1", ("logits", "features")))
    assert {"train_ce", "train_kd", "train_nd"} <= set(result.metrics[0])


def test_several_cached_teachers_average_their_probabilities(two_teacher_store):
    from stages.teachers.teacher_sources import CachedEnsemble

    store = Store(two_teacher_store)
    ensemble = CachedEnsemble(store, ["t1", "t2"], ("logits",), weights=[3.0, 1.0])
    rows = ensemble.unit_rows(1, 0, 32)
    got = ensemble.outputs(rows, None)["logits"]
    p1 = torch.softmax(
        CachedTeacher(store, "t1", ("logits",)).outputs(
            {"t:" + k[3:]: v for k, v in rows.items() if k.startswith("t0:")}, None
        )["logits"],
        1,
    )
    p2 = torch.softmax(
        CachedTeacher(store, "t2", ("logits",)).outputs(
            {"t:" + k[3:]: v for k, v in rows.items() if k.startswith("t1:")}, None
        )["logits"],
        1,
    )
    torch.testing.assert_close(torch.softmax(got, 1), 0.75 * p1 + 0.25 * p2)
    with pytest.raises(UserError, match="a method that reads features takes one --teacher"):
        CachedEnsemble(store, ["t1", "t2"], ("logits", "features"))
    with pytest.raises(UserError, match="a method that reads tokens takes one --teacher"):  # refused, never dropped
        CachedEnsemble(store, ["t1", "t2"], ("tokens",))
    with pytest.raises(UserError, match="teacher-weights"):
        CachedEnsemble(store, ["t1", "t2"], ("logits",), weights=[1.0])


@pytest.mark.parametrize("name", ["kd", "dkd", "dist"])
def test_logit_methods_on_a_topk_store_with_k_equal_c_match_full_logits(name):
    from stages.cache import teacher_rows

    student, teacher, y = batch()
    full = teacher["logits"]
    info = make_record(outputs=("logits",), logits="topk", k=C, num_classes=C, dtype="float32")
    rows = teacher_rows.encode({"logits": full}, y.labels.clamp(min=0), info)
    rebuilt = teacher_rows.decode(rows, info, ("logits",))["logits"]
    method = create_method(name, context())
    a, _ = method(student, {"logits": full}, y)
    b, _ = method(student, {"logits": rebuilt}, y)
    assert torch.equal(a, b)
    # With k < C the reconstruction keeps the top-k probabilities and the tail's total mass.
    info_k = info.replace(k=3)
    approx = teacher_rows.decode(
        teacher_rows.encode({"logits": full}, y.labels.clamp(min=0), info_k), info_k, ("logits",)
    )["logits"]
    top = full.topk(3, dim=1).indices
    torch.testing.assert_close(torch.softmax(approx, 1).gather(1, top), torch.softmax(full, 1).gather(1, top))


def test_a_feature_method_on_a_logits_only_store_says_how_to_fix_it(tmp_path, capsys):
    from pipeline.cli import main

    store = tmp_path / "s"
    argv = [
        "--quiet",
        "extract",
        "--data",
        "fake:64?size=32",
        "--teacher",
        "resnet10t",
        "--random-init",
        "--size",
        "32",
    ]
    assert main([*argv, "--views", "1", "--block", "32", "--outputs", "logits", "--store", str(store)]) == 0
    capsys.readouterr()
    assert (
        main(["--quiet", "distill", "--from-cache", str(store), "--method", "srd", "--out", str(tmp_path / "o")]) == 2
    )
    assert "under a new --teacher-id with --outputs logits,features" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["kd", "dkd", "dist", "gpd"])
def test_the_label_term_is_logged_under_the_loss_it_is(name):
    """hard_loss: bce (VanillaKD's) is logged as train_bce, not train_ce."""
    logits = torch.randn(8, 10)
    targets = Targets(torch.arange(8) % 10, torch.nn.functional.one_hot(torch.arange(8) % 10, 10).float())
    method = create_method(name, MethodContext(num_classes=10, student_dim=16), hard_loss="bce")
    student = {"logits": logits, "wide_logits": logits.clone()}
    _, parts = method(student, {"logits": torch.randn(8, 10)}, targets)
    assert "bce" in parts and "ce" not in parts
