"""The zarr store: unit round trips, the commit protocol, growing the view axis, and bad stores."""

from __future__ import annotations

from pathlib import Path
import json

import numpy as np
import pytest

from conftest import make_record
from storage import ArraySpec, Store, TeacherRecord, UserError, list_backends
from storage.store import FORMAT_VERSION
from storage.units import checksum

SPECS = {"crop": ArraySpec((4,), "float32"), "flip": ArraySpec((), "uint8")}


def _unit(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"crop": rng.random((rows, 4), dtype=np.float32), "flip": rng.integers(0, 2, rows).astype(np.uint8)}


@pytest.fixture
def store(tmp_path) -> Store:
    # 70 samples in blocks of 32: blocks of 32, 32 and 6 rows.
    return Store.create(tmp_path / "s", meta={"dataset": {"source": "test"}}, num_samples=70, num_views=2, block=32, plan_specs=SPECS)


def test_create_open_round_trip(store, tmp_path):
    full, last = _unit(32, 0), _unit(6, 1)
    store.plan.write_unit(0, 1, full)
    store.plan.write_unit(1, 2, last)

    reopened = Store(tmp_path / "s")
    assert (reopened.num_samples, reopened.num_views, reopened.block, reopened.num_blocks) == (70, 2, 32, 3)
    assert reopened.block_range(2) == range(64, 70)
    assert reopened.meta["dataset"] == {"source": "test"} and reopened.meta["format"] == FORMAT_VERSION
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
    logits = {(v, b): np.random.default_rng(v + 7 * b).random((32, 10)).astype(np.float16) for v in range(2) for b in range(2)}
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
        Store.create(tmp_path / "busy", meta={}, num_samples=10, num_views=1, block=8, plan_specs=SPECS)
    assert (tmp_path / "busy" / "file.txt").read_text() == "mine"


def test_any_block_size_makes_a_working_store(tmp_path):
    store = Store.create(tmp_path / "s", meta={}, num_samples=700, num_views=1, block=300, plan_specs=SPECS)
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


def test_teacher_json_from_older_pipelines_gets_its_defaults(store, tmp_path):
    """Before wds (format), --precision, int8 features (feature_dtype) and per-teacher view counts (views)."""
    old = {k: v for k, v in make_record("old", dtype="float32", feature_dtype="float32").to_dict().items()
           if k not in ("format", "precision", "feature_dtype", "views")}
    store.create_teacher("old", make_record("old"), {"features": ArraySpec((4,), "float16")})
    (tmp_path / "s" / "teachers" / "old" / "teacher.json").write_text(json.dumps(old))
    info = Store(tmp_path / "s").teacher_info("old")
    assert (info.format, info.precision, info.feature_dtype, info.views) == ("zarr", "fp32", "float32", store.num_views)
    with pytest.raises(ValueError, match="lacks timm_name"):
        TeacherRecord.from_dict({k: v for k, v in old.items() if k != "timm_name"})


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
    from storage.lock import TeacherLock

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
    with TeacherLock(Location(str(root / "teachers" / "t" / "lock.json")), "teacher 't'", tidy=Location(str(root))):
        pass
    left = sorted(p.name for p in root.rglob("*") if p.is_file())
    assert left == sorted([keep.name, young.name])
