"""The webdataset backend: unit round trips, the commit protocol, plain webdataset reading, and the
same student from a zarr and a wds store made from the same run."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BATCH, BLOCK, BUCKET, STUDENT, VIEWS, make_record
from safetensors.torch import load_file

from stages.cache import teacher_rows
from stages.training.distill import train
from stages.training.settings import TrainSettings
from stages.teachers.teacher_sources import CachedTeacher
from stages.teachers.extract import TeacherRunner, extract, open_teacher, teacher_info
from stages.cache.store_setup import open_store, stored_plan
from stages.data.replay import StoredViews
from storage import ArraySpec, DatasetRecord, PlanRecord, Store, UserError
from storage.location import Location
from storage.wds import TarUnits, wds_urls

# Every dtype the cache stores, with row shapes of every rank (scalars, vectors, tokens).
SPECS = {
    "logits": ArraySpec((5,), "float32"),
    "topk_values": ArraySpec((3,), "float16"),
    "topk_index": ArraySpec((3,), "int16"),
    "big_index": ArraySpec((3,), "int32"),
    "tokens": ArraySpec((2, 4), "int8"),
    "logsumexp": ArraySpec((), "float32"),
    "fingerprint": ArraySpec((), "uint32"),
}
# a teacher.json that agrees with SPECS (Store checks it against them)
FITS = dict(num_classes=5, logits="full", outputs=("logits",))


def _unit(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in SPECS.items():
        shape = (rows, *spec.row_shape)
        if np.dtype(spec.dtype).kind == "f":
            a = rng.standard_normal(shape).astype(spec.dtype)
            a.flat[0] = -0.0  # bit-exact, not just equal: the sign of zero survives
        else:
            info = np.iinfo(spec.dtype)
            a = rng.integers(info.min, info.max, shape, dtype=spec.dtype, endpoint=True)
        out[name] = a
    return out


@pytest.fixture
def store(tmp_path) -> Store:
    # 70 samples in blocks of 32: blocks of 32, 32 and 6 rows.
    return _bare_store(tmp_path / "s", {"flip": ArraySpec((), "uint8")})


def _bare_store(path, plan_specs) -> Store:
    """70 samples in blocks of 32 (32, 32 and 6 rows), 2 views, no images behind them."""
    dataset = DatasetRecord(source="test", fingerprint="f", num_samples=70, num_classes=1, classes=("a",))
    return Store.create(
        path,
        dataset=dataset,
        plan=PlanRecord(recipe={}, seed=0, size=32),
        versions={},
        num_views=2,
        block=32,
        plan_specs=plan_specs,
    )


@pytest.fixture
def units(store) -> TarUnits:
    return store.create_teacher("w", make_record("w", **FITS, format="wds", views=2), SPECS)


def _tar(units: TarUnits, view: int, block: int) -> Path:
    return Path(units.tar(view, block).path)


# -- round trips -------------------------------------------------------------------------------


def test_units_round_trip_bit_for_bit_for_every_dtype(store, units, tmp_path):
    full, last = _unit(32, 0), _unit(6, 1)
    units.write_unit(0, 1, full)
    units.write_unit(1, 2, last)

    reopened = Store(tmp_path / "s").teacher("w")
    assert isinstance(reopened, TarUnits) and reopened.names == sorted(SPECS)
    assert reopened.committed() == {(0, 1), (1, 2)}
    for view, block, data in ((0, 1, full), (1, 2, last)):
        got = reopened.read_unit(view, block, verify=True)
        for name, a in data.items():
            assert got[name].dtype == a.dtype and got[name].shape == a.shape
            assert got[name].tobytes() == a.tobytes()
    # Rows and arrays are read as asked; never-written units read as the fill value, as in zarr.
    part = reopened.read_unit(0, 1, ["tokens"], rows=5)
    assert list(part) == ["tokens"] and np.array_equal(part["tokens"], full["tokens"][:5])
    assert not reopened.read_unit(0, 0)["logits"].any() and reopened.read_unit(0, 2)["logits"].shape == (6, 5)
    # One tar per unit, one record, the whole unit in one packed member.
    assert sorted(p.name for p in (tmp_path / "s" / "teachers" / "w" / "shards").iterdir()) == [
        "v000000-b000001.tar",
        "v000001-b000002.tar",
    ]


def test_the_same_unit_gives_byte_identical_tars(store, units, tmp_path):
    data = _unit(32, 3)
    units.write_unit(1, 0, data)
    first = _tar(units, 1, 0).read_bytes()
    other = store.create_teacher("w2", make_record("w2", **FITS, format="wds", views=2), SPECS)
    other.write_unit(1, 0, {k: v.copy() for k, v in data.items()})
    units.write_unit(1, 0, data)  # a rerun, later
    assert _tar(other, 1, 0).read_bytes() == first == _tar(units, 1, 0).read_bytes()


def test_a_pipe_named_like_a_tar_is_refused_not_waited_on(units):
    """describe (what inspect reads) samples one tar: a FIFO there is one line, not a reader blocked forever."""
    import os
    import threading

    units.write_unit(0, 0, _unit(32, 0))
    tar = _tar(units, 0, 0)
    tar.unlink()
    os.mkfifo(tar)
    errors = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(UserError, units.describe)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "describe waits on the pipe"
    assert "is not a regular file" in str(errors[0].value)


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_stored_bytes_of_committed_units_leave_out_a_killed_writers_unit(store, backend):
    """A writer killed before its commit leaves the unit's data on disk: inspect counts only committed units."""
    _check_stored_bytes_leave_out_uncommitted(store, backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_stored_bytes_in_a_bucket_leave_out_a_killed_writers_unit(s3, backend):
    url = f"s3://{BUCKET}/stored-bytes-{backend}"
    _check_stored_bytes_leave_out_uncommitted(_bare_store(url, {}), backend)


def _check_stored_bytes_leave_out_uncommitted(store, backend):
    units = store.create_teacher("k", make_record("k", **FITS, format=backend, views=2), SPECS)
    units.write_unit(0, 0, _unit(32, 0))
    whole = sum(d["stored_bytes"] for d in units.describe({(0, 0)}).values())
    units.write_unit(1, 1, _unit(32, 1))
    units.uncommit(1, 1)  # its data stays, as after a kill between the write and the commit
    assert units.committed() == {(0, 0)}
    assert sum(d["stored_bytes"] for d in units.describe(units.committed()).values()) == whole
    assert sum(d["stored_bytes"] for d in units.describe().values()) > whole  # every byte on disk, as before


def test_describe_and_growing_the_view_axis_need_no_tars(store, units, tmp_path):
    units.write_unit(0, 0, _unit(32, 0))
    described = units.describe()
    assert described["tokens"] == {**described["tokens"], "dtype": "int8", "shape": [2, 70, 2, 4], "nbytes": 2 * 70 * 8}
    tar_bytes = _tar(units, 0, 0).stat().st_size
    assert abs(sum(d["stored_bytes"] for d in described.values()) - tar_bytes) <= len(SPECS)

    store.add_views(5)
    grown = Store(tmp_path / "s").teacher("w")
    assert grown.describe()["logits"]["shape"] == [5, 70, 5]
    assert grown.committed() == {(0, 0)}
    grown.write_unit(4, 2, _unit(6, 9))
    assert grown.read_unit(4, 2, verify=True)["fingerprint"].tobytes() == _unit(6, 9)["fingerprint"].tobytes()


# -- the commit protocol -----------------------------------------------------------------------


def test_no_record_and_no_tar_when_writing_fails(units, monkeypatch):
    bad = _unit(32, 0)
    bad["tokens"] = np.zeros((32, 3, 4), np.int8)  # wrong row shape
    with pytest.raises(ValueError, match="tokens"):
        units.write_unit(0, 0, bad)
    short = {**_unit(32, 0), "logits": np.zeros((31, 5), np.float32)}  # arrays of unequal length
    with pytest.raises(ValueError, match="rows"):
        units.write_unit(0, 0, short)

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Location, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space"):
        units.write_unit(0, 1, _unit(32, 1))
    monkeypatch.undo()
    assert units.committed() == set() and units.commits.listdir() == [] and units.shards.listdir() == []


def test_check_unit_finds_damaged_tars_and_records(units):
    for b in range(3):
        units.write_unit(0, b, _unit(32 if b < 2 else 6, b))
    assert [units.check_unit(0, b) for b in range(3)] == [None, None, None]

    tar = _tar(units, 0, 0)
    raw = bytearray(tar.read_bytes())
    with tarfile.open(tar) as t:
        member = t.getmember("v000000-b000000.npz")
    middle = member.offset_data + member.size // 2  # inside the packed member's compressed bytes
    raw[middle : middle + 8] = bytes(b ^ 0xFF for b in raw[middle : middle + 8])
    tar.write_bytes(bytes(raw))
    assert "cannot be read" in units.check_unit(0, 0)  # the zip's CRC or deflate stream fails

    _tar(units, 0, 1).unlink()
    assert units.check_unit(0, 1) == "missing shard (" + ", ".join(sorted(SPECS)) + ")"

    record = Path(units._record(0, 2).path)
    record.write_text(record.read_text()[:20])
    assert "unreadable" in units.check_unit(0, 2)
    with pytest.raises(UserError, match="unreadable"):
        units.read_unit(0, 2, verify=True)


def test_a_damaged_uncommitted_tar_is_rewritten(units):
    units.write_unit(0, 0, _unit(32, 0))
    units.uncommit(0, 0)
    _tar(units, 0, 0).write_bytes(_tar(units, 0, 0).read_bytes()[:700])  # torn
    data = _unit(32, 1)
    units.write_unit(0, 0, data)
    assert units.check_unit(0, 0) is None
    assert units.read_unit(0, 0, verify=True)["logits"].tobytes() == data["logits"].tobytes()


# -- plain webdataset ------------------------------------------------------------------------------


def test_a_plain_webdataset_pipeline_reads_the_tars(store, units):
    import webdataset as wds

    written = {(v, b): _unit(32 if b < 2 else 6, 10 * v + b) for v in range(2) for b in range(3)}
    for (v, b), data in written.items():
        units.write_unit(v, b, data)
    units.uncommit(1, 2)  # not committed: not listed for readers

    urls = wds_urls(store, "w")
    assert len(urls) == 5 and urls[0].endswith("teachers/w/shards/v000000-b000000.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"v{v:06d}-b{b:06d}" for v in range(2) for b in range(3)][:5]
    for s in samples:
        meta = s["json"]
        data = written[meta["view"], meta["block"]]
        assert meta["start"] == 32 * meta["block"] and meta["rows"] == len(data["logits"])
        assert sorted(s["npz"]) == sorted(SPECS)
        for name, a in data.items():
            assert s["npz"][name].dtype == a.dtype and s["npz"][name].tobytes() == a.tobytes()
    store.create_teacher("plain", make_record("plain", **FITS, views=2), SPECS)  # zarr
    with pytest.raises(UserError, match="not wds"):
        wds_urls(store, "plain")


# -- the invariant: the same student from either backend -----------------------------------------


def _extract(path, train_data, plan, teacher, store_format) -> Store:
    store = open_store(path, train_data, plan, views=VIEWS, block=BLOCK, size=32)
    runner = TeacherRunner(
        teacher, teacher_info(teacher, teacher_rows.output_info(teacher, logits="full", dtype="float32"), store_format)
    )
    extract(store, train_data, runner, "t1", views=VIEWS, batch_size=BATCH)
    return store


def test_zarr_and_wds_stores_of_one_run_train_the_same_student(base_store, train_data, plan, teacher1, tmp_path):
    # base_store: teacher1, full float32 logits, extracted into zarr; the same run into wds:
    wds_store = _extract(tmp_path / "wds", train_data, plan, teacher1, "wds")
    zarr_store = Store(base_store)
    assert isinstance(wds_store.teacher("t1"), TarUnits) and wds_store.teacher_info("t1").format == "wds"
    assert not (tmp_path / "wds" / "teachers" / "t1" / "logits").exists()  # no zarr arrays beside the tars
    for v in range(VIEWS):
        for b in range(zarr_store.num_blocks):
            a, w = zarr_store.teacher("t1").record(v, b), wds_store.teacher("t1").record(v, b)
            assert a["checksums"] == w["checksums"] and a["rows"] == w["rows"]

    weights = {}
    for name, store in (("zarr", zarr_store), ("wds", wds_store)):
        views = StoredViews(store, stored_plan(store))
        settings = TrainSettings(**STUDENT, epochs=2, batch_size=BATCH, verify="all")
        train(
            settings,
            train_data,
            None,
            views,
            views.plan,
            CachedTeacher(store, "t1", ("logits",)),
            out_dir=tmp_path / name,
        )
        weights[name] = load_file(str(tmp_path / name / "student.safetensors"))
    assert weights["zarr"].keys() == weights["wds"].keys()
    assert [k for k in weights["zarr"] if not torch.equal(weights["zarr"][k], weights["wds"][k])] == []
    metrics = [
        [
            {k: v for k, v in json.loads(line).items() if k not in ("seconds", "views_per_s")}
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        for name in ("zarr", "wds")
    ]
    assert metrics[0] == metrics[1] and all(m["train_kd"] > 0 for m in metrics[0])


def test_one_teacher_id_keeps_one_format(store_copy, teacher1):
    store = Store(store_copy)
    info = teacher_info(teacher1, teacher_rows.output_info(teacher1, logits="full", dtype="float32"), "wds")
    with pytest.raises(UserError, match="other format.*format=zarr.*--teacher-id"):
        open_teacher(store, "t1", info, 10, VIEWS)
    open_teacher(store, "t1", info.replace(format="zarr"), 10, VIEWS)
    assert Store(store_copy).teacher_info("t1").format == "zarr"
    # A teacher.json without its format key is damaged, not zarr by default.
    path = store_copy / "teachers" / "t1" / "teacher.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "format"}))
    with pytest.raises(UserError, match="teacher.json lacks format"):
        open_teacher(Store(store_copy), "t1", info.replace(format="zarr"), 10, VIEWS)
