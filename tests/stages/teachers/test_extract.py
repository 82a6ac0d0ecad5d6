"""Stage one: resumable extraction, appending views, several teachers in one store, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BATCH, BLOCK, SIZE, VIEWS, group_arrays, make_teacher, read_tree, runner_for

from stages.data.datasets import open_dataset
from stages.teachers.extract import TeacherRunner, extract
from stages.cache.store_setup import open_store
from stages.data.views import ViewPlan, ViewRecipe
from storage import Store, UserError

FULL = dict(logits="full", dtype="float32")


def _assert_same_arrays(got: dict, want: dict):
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _reopen(path, train_data, plan, views=VIEWS):
    return open_store(path, train_data, plan, views=views, block=BLOCK, size=SIZE)


def test_extract_writes_every_unit_once(base_store, train_data):
    store = Store(base_store)
    assert store.teacher_ids() == ["t1"]
    units = {(v, b) for v in range(VIEWS) for b in range(3)}
    assert store.plan.committed() == units and store.teacher("t1").committed() == units
    info = store.teacher_info("t1")
    assert (info.name, info.logits, info.dtype, info.num_classes) == ("resnet18", "full", "float32", 10)
    assert info.weights == "random-init:seed=0" and info.views == VIEWS
    assert store.record.dataset.fingerprint == train_data.fingerprint()
    logits = store.teacher("t1").array("logits")[:]
    assert logits.shape == (VIEWS, len(train_data), 10) and np.isfinite(logits).all()
    assert (np.abs(logits).sum(-1) > 0).all()  # every row written, none left at the fill value
    assert not np.array_equal(logits[0], logits[1])  # two views, two different inputs


def test_extracting_again_skips_committed_units_and_changes_no_byte(store_copy, train_data, plan, teacher1):
    before = read_tree(store_copy)
    result = extract(
        _reopen(store_copy, train_data, plan),
        train_data,
        runner_for(teacher1, **FULL),
        "t1",
        views=VIEWS,
        batch_size=BATCH,
    )
    assert (result.units, result.skipped, result.views) == (0, VIEWS * 3, 0)
    assert read_tree(store_copy) == before


@pytest.mark.parametrize("recipe", [{}, {"mixup_alpha": 0.8, "mix_pair_views": 2}], ids=["plain", "shared-partner"])
def test_the_views_of_a_block_decode_each_image_once_and_store_what_units_alone_store(
    recipe, tmp_path, train_data, teacher1, monkeypatch
):
    """Two views extracted in one run: each image is decoded once for both (its block's views render together),
    and the store holds what extracting each unit by itself (a Ray actor's way) holds, bit for bit."""
    from collections import Counter

    from stages.teachers.extract import UnitExtractor, open_teacher

    plan = ViewPlan(ViewRecipe(**recipe), seed=0)
    runner = runner_for(teacher1, **FULL)
    by_unit = _reopen(tmp_path / "by-unit", train_data, plan)
    open_teacher(by_unit, "t", runner.info, train_data.num_classes, VIEWS)
    worker = UnitExtractor(by_unit, train_data, runner, "t", batch_size=BATCH)
    for v, b in by_unit.units(VIEWS):
        worker.run([(v, b)])
    calls = Counter()
    original = type(train_data).image
    monkeypatch.setattr(type(train_data), "image", lambda self, i: calls.update([i]) or original(self, i))
    extract(_reopen(tmp_path / "together", train_data, plan), train_data, runner, "t", views=VIEWS, batch_size=BATCH)
    assert sorted(calls) == list(range(len(train_data))) and set(calls.values()) == {1}
    together, by_unit = Store(tmp_path / "together"), Store(tmp_path / "by-unit")
    _assert_same_arrays(group_arrays(together.plan), group_arrays(by_unit.plan))
    _assert_same_arrays(group_arrays(together.teacher("t")), group_arrays(by_unit.teacher("t")))


class CrashingRunner(TeacherRunner):
    """The real teacher, dying on its ``crash_at``-th batch as a killed worker would."""

    def __init__(self, runner: TeacherRunner, crash_at: int):
        super().__init__(runner.teacher, runner.info)
        self.calls, self.crash_at = 0, crash_at

    def __call__(self, views, labels):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("worker killed")
        return super().__call__(views, labels)


def test_a_crashed_extraction_resumes_to_the_same_bytes(tmp_path, train_data, plan, teacher1, reference):
    path = tmp_path / "store"
    runner = runner_for(teacher1, **FULL)
    # Batches of 16 in blocks of 32: the crash comes half way through unit (0, 1).
    with pytest.raises(RuntimeError, match="worker killed"):
        extract(
            _reopen(path, train_data, plan),
            train_data,
            CrashingRunner(runner, crash_at=4),
            "t1",
            views=VIEWS,
            batch_size=16,
        )
    store = Store(path)
    assert store.teacher("t1").committed() == {(0, 0)}  # no half unit
    assert store.plan.committed() == {(0, 0)}

    result = extract(_reopen(path, train_data, plan), train_data, runner, "t1", views=VIEWS, batch_size=BATCH)
    assert (result.units, result.skipped) == (VIEWS * 3 - 1, 1)
    _assert_same_arrays(group_arrays(Store(path).teacher("t1")), reference["t1"])
    _assert_same_arrays(group_arrays(Store(path).plan), reference["plan"])


def test_uncommitted_leftovers_are_rewritten(store_copy, train_data, plan, teacher1, reference):
    store = Store(store_copy)
    teacher = store.teacher("t1")
    rng = np.random.default_rng(0)
    # Units whose writers died after writing (garbage) data but before the commit record.
    for v, b in ((1, 1), (0, 2)):
        (store_copy / "teachers" / "t1" / "commits" / f"v{v:06d}-b{b:06d}.json").unlink()
        rows = store.block_range(b)
        for name in teacher.names:
            arr = teacher.array(name)
            arr[v, rows.start : rows.stop] = rng.normal(size=(len(rows), *arr.shape[2:])).astype(arr.dtype)
    # For (1, 1) the plan unit died too.
    (store_copy / "plan" / "commits" / "v000001-b000001.json").unlink()
    store.plan.array("crop")[1, 32:64] = rng.random((32, 4)).astype(np.float32)
    store.plan.array("fingerprint")[1, 32:64] = 0
    assert teacher.committed() == {(0, 0), (0, 1), (1, 0), (1, 2)}

    result = extract(
        _reopen(store_copy, train_data, plan),
        train_data,
        runner_for(teacher1, **FULL),
        "t1",
        views=VIEWS,
        batch_size=BATCH,
    )
    assert (result.units, result.skipped) == (2, VIEWS * 3 - 2)
    assert Store(store_copy).teacher("t1").committed() == {(v, b) for v in range(VIEWS) for b in range(3)}
    _assert_same_arrays(group_arrays(Store(store_copy).teacher("t1")), reference["t1"])
    _assert_same_arrays(group_arrays(Store(store_copy).plan), reference["plan"])


def test_more_views_are_appended_without_touching_existing_ones(store_copy, train_data, plan, teacher1, reference):
    def old_view_files():
        # Shard objects of views 0 and 1 (keys c/<view>/...) and every commit record so far.
        return {k: v for k, v in read_tree(store_copy).items() if "/c/0/" in k or "/c/1/" in k or "commits/" in k}

    before = old_view_files()
    result = extract(
        _reopen(store_copy, train_data, plan), train_data, runner_for(teacher1, **FULL), "t1", views=3, batch_size=BATCH
    )
    assert (result.units, result.skipped) == (3, VIEWS * 3)

    after = old_view_files()
    assert {k: after[k] for k in before} == before  # old shards and records: byte for byte
    reopened = Store(store_copy)
    assert reopened.num_views == 3 and reopened.teacher_info("t1").views == 3
    assert reopened.teacher("t1").committed() == {(v, b) for v in range(3) for b in range(3)}
    for group, ref in ((reopened.plan, reference["plan"]), (reopened.teacher("t1"), reference["t1"])):
        got = group_arrays(group)
        _assert_same_arrays({k: a[:VIEWS] for k, a in got.items()}, ref)
        assert all(a.shape[0] == 3 for a in got.values())
    new_crop = reopened.plan.array("crop")[2]
    assert not np.array_equal(new_crop, reference["plan"]["crop"][0]) and not np.array_equal(
        new_crop, reference["plan"]["crop"][1]
    )


def test_second_teacher_shares_the_plan_and_leaves_it_untouched(base_store, two_teacher_store, reference):
    assert {k: v for k, v in read_tree(two_teacher_store).items() if k.startswith("plan/")} == {
        k: v for k, v in read_tree(base_store).items() if k.startswith("plan/")
    }
    store = Store(two_teacher_store)
    assert store.teacher_ids() == ["t1", "t2"]
    _assert_same_arrays(group_arrays(store.teacher("t1")), reference["t1"])
    t2 = store.teacher("t2")
    assert t2.committed() == {(v, b) for v in range(VIEWS) for b in range(3)}
    assert store.teacher_info("t2").weights == "random-init:seed=1"
    assert t2.names == ["features", "logsumexp", "tail", "topk_index", "topk_logp"]
    # Another teacher: its top classes are not t1's.
    t1_top = np.argsort(-reference["t1"]["logits"], axis=-1)[..., :3]
    assert not np.array_equal(np.sort(t2.array("topk_index")[:], -1), np.sort(t1_top, -1))


def test_a_teacher_with_more_views_leaves_the_others_complete(wide_store, reference):
    from stages.teachers.teacher_sources import CachedTeacher

    store = Store(wide_store)
    assert store.num_views == 3 and store.plan.complete_views(store.num_blocks) == 3
    assert store.teacher_info("t1").views == VIEWS and store.teacher_info("wide").views == 3
    assert CachedTeacher(store, "t1", ("logits",)).num_views == VIEWS  # still complete: no refusal
    t1 = group_arrays(store.teacher("t1"))
    _assert_same_arrays({k: a[:VIEWS] for k, a in t1.items()}, reference["t1"])
    # The same model on the same recorded views: the new teacher's first views are t1's, bit for bit.
    wide = group_arrays(store.teacher("wide"))
    _assert_same_arrays({k: a[:VIEWS] for k, a in wide.items()}, reference["t1"])


def test_second_teacher_checks_the_plan_fingerprints(store_copy, train_data, plan, teacher1):
    store = Store(store_copy)
    # The plan as another renderer would have recorded it: the ninth sample of block 1 with another fingerprint.
    unit = store.plan.read_unit(0, 1, rows=32)
    unit["fingerprint"][8] ^= 1
    store.plan.write_unit(0, 1, unit)
    sample = int(store.block_ids(1)[8])
    with pytest.raises(UserError, match=f"view 0 of sample {sample} replays differently"):
        extract(
            _reopen(store_copy, train_data, plan),
            train_data,
            runner_for(teacher1, **FULL),
            "again",
            views=VIEWS,
            batch_size=BATCH,
        )
    # Block by block (each image decoded once for both views): block 0's two views, then nothing after the mismatch.
    assert Store(store_copy).teacher("again").committed() == {(0, 0), (1, 0)}


@pytest.mark.parametrize(
    "other",
    [
        dict(data="fake:81?size=32"),
        dict(data="fake:80?size=32&classes=5"),
        dict(seed=1),
        dict(recipe=ViewRecipe(hflip=0.0)),
    ],
    ids=["more-samples", "other-labels", "plan-seed", "plan-recipe"],
)
def test_reopening_with_another_dataset_or_plan_is_refused(store_copy, train_data, other):
    dataset = open_dataset(other["data"]) if "data" in other else train_data
    plan = ViewPlan(other.get("recipe", ViewRecipe()), seed=other.get("seed", 0))
    before = read_tree(store_copy)
    with pytest.raises(UserError, match="use the same"):
        _reopen(store_copy, dataset, plan)
    assert read_tree(store_copy) == before


def test_teacher_with_other_class_count_is_refused(store_copy, train_data, plan):
    five = make_teacher(num_classes=5)
    with pytest.raises(UserError, match="predicts 5 classes but the dataset has 10"):
        extract(
            _reopen(store_copy, train_data, plan),
            train_data,
            runner_for(five, **FULL),
            "five",
            views=VIEWS,
            batch_size=BATCH,
        )
    assert Store(store_copy).teacher_ids() == ["t1"]


def test_same_teacher_id_with_other_settings_is_refused(store_copy, train_data, plan, teacher1):
    before = read_tree(store_copy)
    with pytest.raises(UserError, match="teacher 't1' with other dtype"):
        extract(
            _reopen(store_copy, train_data, plan),
            train_data,
            runner_for(teacher1, logits="full", dtype="float16"),
            "t1",
            views=VIEWS,
        )
    assert read_tree(store_copy) == before


def test_a_bf16_teacher_is_recorded_close_to_fp32_and_never_mixed_with_it(store_copy, train_data, plan, teacher1):
    from stages.cache import teacher_rows
    from stages.teachers.extract import teacher_info

    bf16 = TeacherRunner(teacher1, teacher_info(teacher1, teacher_rows.output_info(teacher1, **FULL), precision="bf16"))
    extract(_reopen(store_copy, train_data, plan), train_data, bf16, "bf", views=VIEWS, batch_size=BATCH)
    store = Store(store_copy)
    assert store.teacher_info("bf").precision == "bf16" and store.teacher_info("t1").precision == "fp32"
    fp32, low = store.teacher("t1").array("logits")[:], store.teacher("bf").array("logits")[:]
    assert not np.array_equal(fp32, low)  # autocast really ran in bfloat16
    assert np.corrcoef(fp32.ravel(), low.ravel())[0, 1] > 0.99
    with pytest.raises(UserError, match="teacher 'bf' with other precision"):
        extract(_reopen(store_copy, train_data, plan), train_data, runner_for(teacher1, **FULL), "bf", views=VIEWS + 1)


def test_progress_comes_per_teacher_batch_not_per_unit(tmp_path, train_data, plan, teacher1, monkeypatch, caplog):
    """A big teacher on a CPU spends minutes in one unit: progress is counted per batch, so the first line comes
    before the first unit commits (here: one unit of 32 samples in batches of 8, a line allowed every 0 s)."""
    import logging

    from stages import progress
    from stages.teachers import extract as extract_module

    class Eager(progress.Progress):
        def __init__(self, what, total, unit="views", every=0.0):
            super().__init__(what, total, unit, every=0.0)

    monkeypatch.setattr(extract_module, "Progress", Eager)
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    store = open_store(tmp_path / "s", train_data, plan, views=1, block=BLOCK, size=SIZE)
    extract(store, train_data, runner_for(teacher1), "t", views=1, batch_size=8)
    done = [
        int(r.getMessage().split(": ")[1].split("/")[0].replace(",", ""))
        for r in caplog.records
        if r.name == "pipeline.progress"
    ]
    assert done[0] == 8 and done[-1] == len(train_data) and len(done) == len(train_data) // 8
