"""The zarr store: unit round trips, the commit protocol, growing the view axis, and bad stores."""

from __future__ import annotations

from pathlib import Path
import json
import re

import numpy as np
import pytest

from conftest import make_record
from storage import ArraySpec, DatasetRecord, PlanRecord, Store, TeacherRecord, UserError, list_backends
from storage.store import FORMAT_VERSION
from storage.units import checksum

SPECS = {"crop": ArraySpec((4,), "float32"), "flip": ArraySpec((), "uint8")}
PLAN = PlanRecord(recipe={"crop_scale": [0.08, 1.0]}, seed=0, size=32)


def _dataset(n: int) -> DatasetRecord:
    return DatasetRecord(source="test", fingerprint="f" * 32, num_samples=n, num_classes=2, classes=("a", "b"))


def _create(path, n: int, views: int, block: int) -> Store:
    return Store.create(
        path, dataset=_dataset(n), plan=PLAN, versions={"numpy": "1"}, num_views=views, block=block, plan_specs=SPECS
    )


def _unit(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"crop": rng.random((rows, 4), dtype=np.float32), "flip": rng.integers(0, 2, rows).astype(np.uint8)}


@pytest.fixture
def store(tmp_path) -> Store:
    # 70 samples in blocks of 32: blocks of 32, 32 and 6 rows.
    return _create(tmp_path / "s", 70, views=2, block=32)


def test_create_open_round_trip(store, tmp_path):
    full, last = _unit(32, 0), _unit(6, 1)
    store.plan.write_unit(0, 1, full)
    store.plan.write_unit(1, 2, last)

    reopened = Store(tmp_path / "s")
    assert (reopened.num_samples, reopened.num_views, reopened.block, reopened.num_blocks) == (70, 2, 32, 3)
    assert reopened.block_range(2) == range(64, 70)
    record = reopened.record
    assert (
        record.dataset == _dataset(70)
        and record.plan == PLAN
        and record.format == FORMAT_VERSION
        and record.versions == {"numpy": "1"}
    )
    assert (record.num_samples, record.num_views, record.block, record.order.kind, record.order.seed) == (
        70,
        2,
        32,
        "source",
        None,
    )
    plan = reopened.plan
    assert plan.names == ["crop", "flip"]
    assert plan.committed() == {(0, 1), (1, 2)}
    for view, block, data in ((0, 1, full), (1, 2, last)):
        got = plan.read_unit(view, block, rows=len(data["flip"]))
        for name in data:
            assert got[name].dtype == data[name].dtype
            np.testing.assert_array_equal(got[name], data[name])
    # Only the requested arrays are read.
    assert list(plan.read_unit(0, 1, ["flip"])) == ["flip"]
    # Units never written read as the fill value, and sit outside the commits.
    np.testing.assert_array_equal(plan.read_unit(0, 0)["crop"], np.zeros((32, 4), np.float32))


def test_commit_record_describes_the_written_rows(store):
    data = _unit(6, 2)
    store.plan.write_unit(1, 2, data)
    record = json.loads((Path(str(store.path)) / "plan" / "commits" / "v000001-b000002.json").read_text())
    assert (record["view"], record["block"], record["start"], record["rows"]) == (1, 2, 64, 6)
    assert record["checksums"] == {name: checksum(a) for name, a in data.items()}


def test_no_commit_record_when_writing_the_data_fails(store):
    data = _unit(32, 3)
    data["flip"] = np.zeros((32, 5), np.uint8)  # wrong row shape: fails after 'crop' is written
    with pytest.raises(Exception):
        store.plan.write_unit(0, 0, data)
    assert store.plan.committed() == set()
    assert not store.plan.is_committed(0, 0)
    assert store.plan.commits.listdir() == []


def test_a_unit_missing_an_array_is_refused(store):
    with pytest.raises(ValueError, match="flip"):
        store.plan.write_unit(0, 0, {"crop": _unit(32, 0)["crop"]})
    assert store.plan.committed() == set()


def test_data_without_a_commit_record_does_not_count(store):
    store.plan.write_unit(0, 0, _unit(32, 0))
    # A writer that died after its data and before its record:
    store.plan.array("crop")[1, 32:64] = _unit(32, 1)["crop"]
    store.plan.array("flip")[1, 32:64] = _unit(32, 1)["flip"]
    assert store.plan.committed() == {(0, 0)}
    assert store.plan.is_committed(0, 0) and not store.plan.is_committed(1, 1)


def test_add_views_grows_the_view_axis_and_keeps_committed_data(store, tmp_path):
    teacher = store.create_teacher("t", make_record("t", views=2), {"logits": ArraySpec((10,), "float16")})
    units = {(v, b): _unit(32, 10 * v + b) for v in range(2) for b in range(2)}
    logits = {
        (v, b): np.random.default_rng(v + 7 * b).random((32, 10)).astype(np.float16) for v in range(2) for b in range(2)
    }
    for (v, b), data in units.items():
        store.plan.write_unit(v, b, data)
        teacher.write_unit(v, b, {"logits": logits[v, b]})

    store.add_views(5)

    reopened = Store(tmp_path / "s")
    assert reopened.num_views == 5
    assert reopened.plan.array("crop").shape == (5, 70, 4)
    assert reopened.teacher("t").array("logits").shape == (5, 70, 10)
    assert reopened.plan.committed() == set(units) and reopened.teacher("t").committed() == set(units)
    for (v, b), data in units.items():
        got = reopened.plan.read_unit(v, b)
        np.testing.assert_array_equal(got["crop"], data["crop"])
        np.testing.assert_array_equal(got["flip"], data["flip"])
        np.testing.assert_array_equal(reopened.teacher("t").read_unit(v, b)["logits"], logits[v, b])
    np.testing.assert_array_equal(reopened.plan.array("crop")[2:], 0)
    # New views take units like the old ones.
    reopened.plan.write_unit(4, 2, _unit(6, 99))
    np.testing.assert_array_equal(reopened.plan.read_unit(4, 2, rows=6)["crop"], _unit(6, 99)["crop"])
    # Shrinking is not a thing: fewer views leave the store as it is.
    reopened.add_views(3)
    assert Store(tmp_path / "s").num_views == 5


def test_teachers_are_listed_and_unknown_ones_named(store):
    assert store.teacher_ids() == []
    store.create_teacher("b", make_record("b", views=2), {"logits": ArraySpec((3,), "float16")})
    store.create_teacher("a", make_record("a", views=2), {"features": ArraySpec((4,), "float16")})
    assert store.teacher_ids() == ["a", "b"]
    assert store.teacher_info("a") == make_record("a", views=2)
    assert store.teacher("a").names == ["features"]
    with pytest.raises(UserError, match="has no teacher 'c'.*a, b"):
        store.teacher("c")


def test_opening_a_missing_store_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="no store"):
        Store(tmp_path / "nothing-here")
    assert not Store.exists(tmp_path / "nothing-here")


def test_store_of_another_format_raises_user_error(store, tmp_path):
    meta_path = tmp_path / "s" / "store.json"
    meta = json.loads(meta_path.read_text())
    meta["format"] = 999
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="format 999"):
        Store(tmp_path / "s")


def test_damaged_store_json_raises_user_error(store, tmp_path):
    (tmp_path / "s" / "store.json").write_text("{ not json")
    with pytest.raises(UserError, match="damaged"):
        Store(tmp_path / "s")


def test_create_refuses_a_directory_that_is_not_empty(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("mine")
    with pytest.raises(UserError, match="not a store"):
        _create(tmp_path / "busy", 10, views=1, block=8)
    assert (tmp_path / "busy" / "file.txt").read_text() == "mine"


def test_any_block_size_makes_a_working_store(tmp_path):
    store = _create(tmp_path / "s", 700, views=1, block=300)
    data = _unit(300, 0)
    store.plan.write_unit(0, 1, data)
    np.testing.assert_array_equal(store.plan.read_unit(0, 1)["crop"], data["crop"])


def test_an_uncommitted_damaged_shard_is_rewritten(store):
    store.plan.write_unit(0, 0, _unit(32, 0))
    shard = Path(str(store.path)) / "plan" / "crop" / "c" / "0" / "0" / "0"
    assert shard.is_file()
    # Unit (0, 0) is taken back (its record removed) and its shard found damaged, e.g. by a torn write.
    (Path(str(store.path)) / "plan" / "commits" / "v000000-b000000.json").unlink()
    shard.write_bytes(shard.read_bytes()[:40])
    data = _unit(32, 1)
    store.plan.write_unit(0, 0, data)
    np.testing.assert_array_equal(store.plan.read_unit(0, 0)["crop"], data["crop"])


def test_units_are_every_view_and_block_view_major(store):
    assert store.units(2) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert store.units(0) == []


def test_teacher_json_is_the_records_fields_and_reads_back_equal(store, tmp_path):
    record = make_record("a", views=2)
    store.create_teacher("a", record, {"features": ArraySpec((4,), "float16")})
    on_disk = json.loads((tmp_path / "s" / "teachers" / "a" / "teacher.json").read_text())
    assert on_disk == record.to_dict() and isinstance(on_disk["outputs"], list)
    assert "num_tokens" not in on_disk  # token fields only for teachers that store tokens
    assert TeacherRecord.from_dict(on_disk) == record


@pytest.mark.parametrize("field", ["format", "precision", "feature_dtype", "views", "timm_name"])
def test_a_teacher_json_lacking_a_field_is_refused_in_one_line(store, tmp_path, field):
    """No defaults for files of earlier pipelines (their store format is refused anyway): a missing field is damage."""
    store.create_teacher("old", make_record("old", views=2), {"features": ArraySpec((4,), "float16")})
    path = tmp_path / "s" / "teachers" / "old" / "teacher.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != field}))
    with pytest.raises(UserError, match=f"cannot read .*teacher.json: teacher.json lacks {field}; .*extract it again"):
        Store(tmp_path / "s").teacher_info("old")
    with pytest.raises(UserError, match="views"):
        # a record without its view count
        store.create_teacher("new", make_record("new"), {"features": ArraySpec((4,), "float16")})


def test_tokens_fields_are_needed_only_with_tokens():
    record = make_record("t", views=1).to_dict()
    assert TeacherRecord.from_dict(record).num_tokens is None
    with pytest.raises(ValueError, match="lacks num_tokens, token_dim, token_prefix"):
        TeacherRecord.from_dict({**record, "outputs": ["features", "tokens"]})


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda d: d.pop("block"), "field 'block' is missing"),
        (lambda d: d["plan"].pop("size"), "field 'plan.size' is missing"),
        (lambda d: d["plan"].update(size="32"), "field 'plan.size' must be a whole number in [1, 4,096], not '32'"),
        (lambda d: d["dataset"].update(fingerprint=7), "field 'dataset.fingerprint' must be a non-empty string, not 7"),
        (
            lambda d: d["order"].update(kind="shuffled"),
            "field 'order.kind' must be one of permuted, source, not 'shuffled'",
        ),
        (lambda d: d.update(num_views=True), "field 'num_views' must be a whole number in [1, 100,000], not True"),
        (
            lambda d: d["dataset"].update(num_samples=71),
            "field 'dataset.num_samples' is 71, but the store's arrays have num_samples 70 rows",
        ),
        (
            lambda d: d["dataset"].update(classes=["a"]),
            "field 'dataset.classes' names 1 classes, but 'dataset.num_classes' is 2",
        ),
        (lambda d: d.update(versions=[]), "field 'versions' must be an object"),
    ],
)
def test_a_damaged_store_json_field_is_one_user_error_naming_the_file_and_field(store, tmp_path, change, problem):
    path = tmp_path / "s" / "store.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(
        UserError, match=f"cannot read .*store.json: {re.escape(problem)}.*; the store is damaged, extract it again"
    ):
        Store(tmp_path / "s")


def test_store_json_is_the_records_fields_and_grows_with_the_views(store, tmp_path):
    on_disk = json.loads((tmp_path / "s" / "store.json").read_text())
    assert on_disk == store.record.to_dict() and on_disk["order"] == {
        "kind": "source",
        "checksum": checksum(np.arange(70)),
    }
    assert on_disk["dataset"]["classes"] == ["a", "b"] and on_disk["plan"] == {
        "recipe": {"crop_scale": [0.08, 1.0]},
        "seed": 0,
        "size": 32,
    }
    store.add_views(3)
    assert Store(tmp_path / "s").record == store.record.replace(num_views=3) and store.num_views == 3


def test_a_damaged_teacher_json_or_unknown_backend_is_one_user_error(store, tmp_path):
    store.create_teacher("a", make_record("a", views=2), {"features": ArraySpec((4,), "float16")})
    path = tmp_path / "s" / "teachers" / "a" / "teacher.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "format": "nope"}))
    assert list_backends()[:2] == ["zarr", "wds"]
    with pytest.raises(UserError, match="unknown store format 'nope' \\(known: zarr, wds"):
        store.teacher("a")
    path.write_text('{"name": "a", ')
    with pytest.raises(UserError, match="cannot read .*teacher.json"):
        store.teacher_info("a")


def test_a_new_lock_holder_removes_temporary_files_of_killed_writers(tmp_path):
    import os
    import time

    from storage import Location
    from storage.lock import WriterLock

    root = tmp_path / "store"
    own = root / "teachers" / "t" / "commits"
    plan = root / "plan" / "commits"
    own.mkdir(parents=True)
    plan.mkdir(parents=True)
    (own / ".v000000-b000003.json.0123abcd.tmp").write_text("{")  # killed between write and rename
    old, young = plan / ".v000001-b000000.json.89abcdef.tmp", plan / ".v000002-b000000.json.fedcba98.tmp"
    old.write_text("{")
    young.write_text("{")  # may belong to another teacher's running extraction: kept
    os.utime(old, (time.time() - 120, time.time() - 120))
    keep = own / "v000000-b000002.json"
    keep.write_text("{}")
    with WriterLock(Location(str(root / "teachers" / "t" / "lock.json")), "teacher 't'", tidy=Location(str(root))):
        pass
    left = sorted(p.name for p in root.rglob("*") if p.is_file())
    assert left == sorted([keep.name, young.name])
