"""Stage two: the cached teacher trains the same student as the live one, epochs use every view, losses."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BATCH, STUDENT
from safetensors.torch import load_file

from stages.training.distill import train

from stages.training.settings import TrainSettings
from stages.training.batch import targets
from stages.training.student import build_student
from stages.teachers.teacher_sources import CachedTeacher, LiveTeacher
from stages.cache.store_setup import stored_plan
from stages.methods.losses import kd_loss
from stages.methods import MethodContext, create_method, hard_loss
from stages.data.replay import StoredViews, epoch_units, labelled_mask
from storage import DamagedUnit, Store, UserError


def _settings(**kw) -> TrainSettings:
    return TrainSettings(**{**STUDENT, "epochs": 2, "batch_size": BATCH, "verify": "all", **kw})


def _views(path):
    store = Store(path)
    return store, StoredViews(store, stored_plan(store))


def _timeless(metrics):
    return [{k: v for k, v in m.items() if k not in ("seconds", "views_per_s")} for m in metrics]


# -- the invariant ---------------------------------------------------------------------------


def test_cached_teacher_trains_the_same_student_as_the_live_teacher_bit_for_bit(
    base_store, train_data, val_data, teacher1, teacher2
):
    store, views = _views(base_store)
    s = _settings()
    cached = train(s, train_data, val_data, views, views.plan, CachedTeacher(store, "t1", ("logits",)))
    live = train(s, train_data, val_data, views, views.plan, LiveTeacher(teacher1, ("logits",)))

    a, b = cached.model.state_dict(), live.model.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    assert _timeless(cached.metrics) == _timeless(live.metrics)

    # Not vacuous: the student moved, and the teacher's outputs steer it.
    init = build_student(s.student, 10, s.seed, **s.student_kwargs).state_dict()
    assert not torch.equal(init["conv1.0.weight"], a["conv1.0.weight"])
    assert all(m["train_kd"] > 0 for m in cached.metrics)
    other = train(s, train_data, val_data, views, views.plan, LiveTeacher(teacher2, ("logits",))).model.state_dict()
    assert not torch.equal(other["fc.weight"], a["fc.weight"])


def test_training_from_a_topk_float16_cache_writes_weights_and_metrics(
    two_teacher_store, train_data, val_data, tmp_path
):
    store, views = _views(two_teacher_store)
    out = tmp_path / "run"
    result = train(
        _settings(), train_data, val_data, views, views.plan, CachedTeacher(store, "t2", ("logits",)), out_dir=out
    )

    weights = load_file(str(out / "student.safetensors"))
    state = result.model.state_dict()
    assert weights.keys() == state.keys()
    assert all(torch.equal(weights[k], state[k]) for k in state)

    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["val_top1"] <= 1.0
        assert math.isfinite(r["train_loss"]) and r["train_kd"] >= 0
    assert records == result.metrics


# -- the epoch order -------------------------------------------------------------------------


@pytest.mark.parametrize("num_views,num_blocks", [(1, 3), (3, 4), (5, 2)])
def test_epoch_units_use_every_view_once_per_cycle(num_views, num_blocks):
    for cycle in range(3):
        seen = {b: [] for b in range(num_blocks)}
        for epoch in range(cycle * num_views, (cycle + 1) * num_views):
            units = epoch_units(epoch, num_views, num_blocks, seed=4)
            assert sorted(b for _, b in units) == list(range(num_blocks))  # every block once per epoch
            for v, b in units:
                seen[b].append(v)
        for b, used in seen.items():
            assert sorted(used) == list(range(num_views)), (cycle, b)


def test_epoch_units_are_a_fixed_function_of_epoch_and_seed():
    # Pinned: a resumed run, every Ray Train rank and a run on another machine or numpy must read the same units.
    assert epoch_units(3, 4, 6, seed=1) == [(2, 2), (1, 3), (1, 4), (2, 0), (2, 5), (0, 1)]
    assert epoch_units(3, 4, 50, seed=1) != epoch_units(3, 4, 50, seed=2)
    assert [b for _, b in epoch_units(0, 4, 50, 1)] != [b for _, b in epoch_units(1, 4, 50, 1)]  # blocks reshuffled
    # Cycles differ: the view order of a block is not the same every cycle.
    orders = {
        tuple(dict((b, v) for v, b in epoch_units(e, 4, 50, 1))[0] for e in range(c * 4, c * 4 + 4)) for c in range(6)
    }
    assert len(orders) > 1


# -- labels ----------------------------------------------------------------------------------


def test_labelled_mask_keeps_a_stratified_fraction():
    labels = np.repeat(np.arange(4), [10, 20, 40, 5])
    mask = labelled_mask(labels, 0.2, seed=0)
    assert mask.dtype == bool and mask.shape == labels.shape
    np.testing.assert_array_equal(np.bincount(labels[mask], minlength=4), [2, 4, 8, 1])
    # Pinned: which labels a student may use must not change between a run, its resume and its Ray workers.
    assert np.flatnonzero(mask).tolist() == [4, 6, 10, 20, 23, 25, 40, 43, 46, 55, 56, 59, 64, 69, 73]
    assert not np.array_equal(mask, labelled_mask(labels, 0.2, seed=1))
    assert labelled_mask(labels, 1.0).all()
    assert not labelled_mask(labels, 0.0).any()


# -- refusals --------------------------------------------------------------------------------


def test_a_replay_that_differs_from_the_recorded_view_is_refused(store_copy, train_data, teacher1):
    store = Store(store_copy)
    for v in range(store.num_views):  # every view of the first 16 samples of block 0, so the first epoch meets one
        # The plan as another renderer would have recorded it (and committed: this is not damage).
        unit = store.plan.read_unit(v, 0, rows=BATCH)
        unit["fingerprint"][:16] ^= 1
        store.plan.write_unit(v, 0, unit)
    store, views = _views(store_copy)
    with pytest.raises(UserError, match=r"of sample \d+ replays differently") as refused:
        train(_settings(epochs=1), train_data, None, views, views.plan, CachedTeacher(store, "t1", ("logits",)))
    sample = int(re.search(r"of sample (\d+) replays", str(refused.value))[1])
    assert sample in store.block_ids(0)[:16]
    # It is the check that refuses: without it the same run goes through.
    train(
        _settings(epochs=1, verify="none"), train_data, None, views, views.plan, CachedTeacher(store, "t1", ("logits",))
    )


def test_an_incomplete_teacher_is_refused(store_copy):
    (store_copy / "teachers" / "t1" / "commits" / "v000001-b000002.json").unlink()
    with pytest.raises(UserError, match="5 of 6 units committed"):
        CachedTeacher(Store(store_copy), "t1", ("logits",))


def test_cached_teacher_refuses_outputs_it_does_not_store(base_store):
    with pytest.raises(UserError, match="has no tokens"):
        CachedTeacher(Store(base_store), "t1", ("tokens",))
    with pytest.raises(UserError, match="no teacher 'nobody'"):
        CachedTeacher(Store(base_store), "nobody", ("logits",))


def test_replaying_views_the_cached_teacher_lacks_is_refused(wide_store, train_data):
    store, views = _views(wide_store)  # the plan has 3 complete views (teacher 'wide')
    cached = CachedTeacher(store, "t1", ("logits",))  # t1 has 2
    assert views.num_views == 3 and cached.num_views == 2
    with pytest.raises(DamagedUnit, match="not committed"):  # rather than zeros as the teacher's view-2 outputs
        cached.unit_rows(2, 0, BATCH)
    with pytest.raises(UserError):
        train(_settings(epochs=1), train_data, None, views, views.plan, cached)


def test_kd_without_a_teacher_is_refused(base_store, train_data):
    _, views = _views(base_store)
    with pytest.raises(UserError, match="method 'kd' needs a teacher"):
        train(_settings(method="kd"), train_data, None, views, views.plan, teacher=None)


def test_unknown_method_and_bad_method_settings_are_refused():
    context = MethodContext(num_classes=10, student_dim=64, teacher_dim=512)
    with pytest.raises(UserError, match="did you mean kd"):
        create_method("kdd", context)
    with pytest.raises(UserError, match="bad settings for method 'kd'"):
        create_method("kd", context, temprature=4.0)
    with pytest.raises(UserError, match="pipeline stats"):
        create_method("kdpp", context)  # no class means
    with pytest.raises(UserError, match="needs teacher features"):
        create_method("srd", MethodContext(num_classes=10, student_dim=64))


# -- losses ----------------------------------------------------------------------------------


def test_kd_loss_is_zero_for_identical_logits():
    s = torch.randn(5, 7)
    assert kd_loss(s, s.clone(), 1.0).item() == pytest.approx(0.0, abs=1e-7)
    assert kd_loss(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s, s + 3.0, 2.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax ignores shifts


def test_kd_loss_golden_value():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    t = torch.tensor([[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]])
    # By hand, with p = softmax([3, 2, 1]) = (0.66524, 0.24473, 0.09003):
    #   row 1: log p_t - log p_s = (2, 0, -2), so KL = 2 (p0 - p2)            = 1.1504208
    #   row 2: p_s is uniform, so KL = log 3 - H(p)                           = 0.2662167
    #   batch mean                                                            = 0.7083187
    assert kd_loss(s, t, 1.0).item() == pytest.approx(0.7083187360, rel=1e-6)
    # T = 2: with q = softmax([1.5, 1, 0.5]), rows (q0 - q2) and log 3 - H(q), mean, times T^2 = 4.
    assert kd_loss(s, t, 2.0).item() == pytest.approx(0.7971552395, rel=1e-6)


@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
def test_kd_loss_scales_with_temperature_squared(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    # Scaling both logits by T leaves the distributions at temperature T those at 1: only T^2 remains.
    assert kd_loss(s * T, t * T, T).item() == pytest.approx(T**2 * kd_loss(s, t, 1.0).item(), rel=1e-5)


def test_ce_loss_ignores_unlabelled_rows():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, generator=g)
    target = torch.tensor([2, -1, 0, -1])
    y = targets(target.numpy(), 5, 0.0)
    expected = F.cross_entropy(s[[0, 2]], target[[0, 2]])
    assert torch.allclose(hard_loss("ce", s, y), expected)
    s2 = s.clone()
    s2[[1, 3]] = 100.0  # unlabelled rows do not matter
    assert torch.equal(hard_loss("ce", s2, y), hard_loss("ce", s, y))


def test_ce_loss_is_zero_with_a_graph_when_nothing_is_labelled():
    s = torch.randn(3, 5, requires_grad=True)
    loss = hard_loss("ce", s, targets(np.full(3, -1), 5, 0.0))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros(3, 5))


def test_heavy_augmentation_replays_exactly_through_both_stages(tmp_path, train_data):
    """RandAugment, jitter, erasing, mixup and cutmix: the student's replayed views are the teacher's
    (every fingerprint checked), and the full float32 cache still stands in for the live teacher bit for bit."""
    from conftest import BLOCK, SIZE, make_teacher, runner_for

    from stages.teachers.extract import extract
    from stages.cache.store_setup import open_store
    from stages.data.views import ViewPlan, ViewRecipe

    recipe = ViewRecipe(
        randaugment="rand-m9-mstd0.5-inc1", color_jitter=0.4, erase_prob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0
    )
    plan = ViewPlan(recipe, seed=5)
    teacher = make_teacher()
    store = open_store(tmp_path / "s", train_data, plan, views=2, block=BLOCK, size=SIZE)
    extract(store, train_data, runner_for(teacher, logits="full", dtype="float32"), "t", views=2, batch_size=BATCH)
    mixed = store.plan.read_unit(0, 0, ["mix_partner"])["mix_partner"]
    assert (mixed >= 0).mean() > 0.5  # most views really are mixed
    views = StoredViews(store, stored_plan(store))
    settings = TrainSettings(
        **STUDENT, method="kd", epochs=2, batch_size=BATCH, size=SIZE, verify="all", label_smoothing=0.1
    )
    cached = train(settings, train_data, None, views, views.plan, CachedTeacher(store, "t", ("logits",)))
    live = train(settings, train_data, None, views, views.plan, LiveTeacher(teacher, ("logits",)))
    a, b = cached.model.state_dict(), live.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
