"""Integrity: damaged stores are found unit by unit, repaired by rewriting only those units, refused by distill.

Each test damages a private copy of the session store the way disks and
crashes do (flipped bytes in a shard, a deleted shard, a truncated commit
record), then drives the commands a user would run.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from stages.cache import verify
from stages.teachers.extract import extract
from storage import DamagedUnit, Store, UserError
from storage.lock import WriterLock
from storage.store import FORMAT_VERSION

from conftest import BATCH, DATA, VIEWS, group_arrays, read_tree, runner_for

TEACHER = ["--teacher", "resnet18", "--random-init", "--teacher-seed", "0", "--teacher-id", "t1"]
EXTRACT = [
    "extract",
    "--data",
    DATA,
    *TEACHER,
    "--size",
    "32",
    "--views",
    str(VIEWS),
    "--logits",
    "full",
    "--dtype",
    "float32",
    "--batch-size",
    str(BATCH),
]


def run(*argv: str) -> int:
    return main(["--quiet", *argv])


def shard(store_path: Path, group: str, array: str, view: int, block: int) -> Path:
    return store_path / group / array / "c" / str(view) / str(block) / "0"


def flip_bytes(store_path: Path) -> tuple:
    path = shard(store_path, "teachers/t1", "logits", 0, 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return ("teacher t1", 0, 1)


def delete_shard(store_path: Path) -> tuple:
    shard(store_path, "teachers/t1", "logits", 1, 0).unlink()  # distillation with kd reads logits only
    return ("teacher t1", 1, 0)


def truncate_record(store_path: Path) -> tuple:
    record = store_path / "plan" / "commits" / "v000001-b000002.json"
    record.write_bytes(record.read_bytes()[:25])
    return ("plan", 1, 2)


DAMAGE = {"flipped": flip_bytes, "deleted": delete_shard, "truncated": truncate_record}


def damage(store_path: Path) -> dict[str, tuple]:
    """Three kinds of damage in three units; returns where each is."""
    return {kind: hurt(store_path) for kind, hurt in DAMAGE.items()}


def test_a_sound_store_verifies(base_store, capsys):
    assert run("verify", str(base_store), "--replay", "1") == 0
    out = capsys.readouterr().out
    assert "sound (12 committed units checked, 160 views replayed)" in out  # plan and t1: 2 views x 3 blocks each


def test_verify_names_each_damaged_unit(store_copy, train_data, capsys):
    where = damage(store_copy)
    report = verify.check_store(Store(store_copy), train_data, replay_fraction=0.5)
    found = {(f.group, f.view, f.block): f for f in report.findings}
    assert set(found) == set(where.values())
    assert (
        "logits differ from the commit record" in found[where["flipped"]].problem
        or "cannot be read" in found[where["flipped"]].problem
    )
    assert "missing shard (logits)" in found[where["deleted"]].problem
    assert "unreadable" in found[where["truncated"]].problem
    # The command prints one line per bad unit, then fails with one summary line.
    assert run("verify", str(store_copy)) == 2
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 3
    assert "3 bad unit(s)" in captured.err and "--repair" in captured.err


def _mtimes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "logs" not in p.parts
    }


def test_repair_rewrites_only_the_damaged_units(store_copy, reference, capsys):
    damage(store_copy)
    before_bytes, before_time = read_tree(store_copy), _mtimes(store_copy)
    assert run(*EXTRACT, "--store", str(store_copy), "--repair") == 0
    assert "3 units extracted" in capsys.readouterr().out  # the three damaged units, nothing else
    store = Store(store_copy)
    assert verify.check_store(store).ok
    for group, arrays in (("t1", group_arrays(store.teacher("t1"))), ("plan", group_arrays(store.plan))):
        for name, want in reference[group].items():
            np.testing.assert_array_equal(arrays[name], want)
    # Files of sound units were not touched; the damaged files are restored byte for byte.
    after_bytes, after_time = read_tree(store_copy), _mtimes(store_copy)
    touched = {p for p in after_time if after_time[p] != before_time.get(p)}
    # shard keys c/VIEW/BLOCK[/0]
    units = ("c/0/1", "v000000-b000001", "c/1/0", "v000001-b000000", "c/1/2", "v000001-b000002", "teacher.json")
    assert touched and all(any(u in p for u in units) for p in touched), sorted(
        p for p in touched if not any(u in p for u in units)
    )
    assert {p for p in after_bytes if after_bytes[p] != before_bytes.get(p) and "logs" not in p} == {
        "teachers/t1/logits/c/0/1/0",
        "teachers/t1/logits/c/1/0/0",
        "plan/commits/v000001-b000002.json",
    }


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_distill_refuses_a_damaged_store(store_copy, tmp_path, kind, capsys):
    DAMAGE[kind](store_copy)
    argv = [
        "distill",
        "--from-cache",
        str(store_copy),
        "--student",
        "resnet10t",
        "--student-arg",
        "channels=[8,16,32,64]",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--out",
        str(tmp_path / "run"),
    ]
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pipeline verify" in err[0], err
    assert not (tmp_path / "run" / "student.safetensors").exists()


def test_read_unit_verify_catches_what_a_plain_read_misses(store_copy):
    path = shard(store_copy, "teachers/t1", "features", 0, 0)
    path.unlink()
    group = Store(store_copy).teacher("t1")
    assert group.read_unit(0, 0, ["features"])["features"].shape == (32, 512)  # zarr fills a missing shard silently
    with pytest.raises(DamagedUnit, match="differ from the commit record"):
        group.read_unit(0, 0, ["features"], verify=True)


def test_a_second_extraction_of_the_same_teacher_refuses(store_copy, capsys):
    store = Store(store_copy)
    with store.lock_teacher("t1"):
        assert run(*EXTRACT, "--store", str(store_copy), "--views", "3") == 2
        err = capsys.readouterr().err
        assert "is being extracted by process" in err and str(os.getpid()) in err
        assert Store(store_copy).num_views == VIEWS  # the refused run changed nothing
    # Released: the same command now runs (and appends the third view).
    assert run(*EXTRACT, "--store", str(store_copy), "--views", "3") == 0


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    lock = tmp_path / "lock.json"
    # A pid that is not running on this host.
    lock.write_text(
        f'{{"host": "{socket.gethostname()}", "pid": 2147483000, "token": "x", "started": 0, "heartbeat": 0}}'
    )
    from storage import Location

    with WriterLock(Location(str(lock)), "teacher t"):
        assert '"pid": %d' % os.getpid() in lock.read_text()
    assert not lock.exists()


def test_a_full_disk_leaves_no_committed_partial_unit(store_copy, train_data, teacher1, monkeypatch, capsys):
    store = Store(store_copy)
    group = store.teacher("t1")
    group.uncommit(1, 2)
    real = type(group)._write_data

    def full_after_first_array(self, view, block, data):
        real(self, view, block, dict(list(data.items())[:1]))
        raise OSError(errno.ENOSPC, "No space left on device", str(self.location))

    monkeypatch.setattr(type(group), "_write_data", full_after_first_array)
    with pytest.raises(OSError):
        extract(
            store, train_data, runner_for(teacher1, logits="full", dtype="float32"), "t1", views=VIEWS, batch_size=BATCH
        )
    assert (1, 2) not in store.teacher("t1").committed()
    # Through the command line it is one line and exit 2.
    assert run(*EXTRACT, "--store", str(store_copy)) == 2
    assert "no space left on device" in capsys.readouterr().err.lower()
    monkeypatch.undo()
    assert run(*EXTRACT, "--store", str(store_copy)) == 0
    assert verify.check_store(Store(store_copy)).ok


@pytest.mark.parametrize("command", ["distill", "extract", "inspect", "verify"])
def test_a_store_of_the_old_format_is_refused_with_how_to_extract_it_again(store_copy, tmp_path, capsys, command):
    """Format 1 laid blocks out as runs of consecutive ids: nothing may read it as if its blocks were random samples."""
    meta = store_copy / "store.json"
    meta.write_text(meta.read_text().replace(f'"format": {FORMAT_VERSION}', '"format": 1'))
    before = read_tree(store_copy)
    argv = {
        "distill": [
            "distill",
            "--from-cache",
            str(store_copy),
            "--student",
            "resnet10t",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
        ],
        "extract": [*EXTRACT, "--store", str(store_copy)],
        "inspect": ["inspect", str(store_copy)],
        "verify": ["verify", str(store_copy)],
    }[command]
    assert run(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"has store format 1, this pipeline reads format {FORMAT_VERSION}" in err[0]
    assert "extract it again into a new --store" in err[0]
    assert read_tree(store_copy) == before and not (tmp_path / "run").exists()


def test_a_store_from_a_newer_pipeline_is_refused(store_copy):
    meta = store_copy / "store.json"
    meta.write_text(meta.read_text().replace(f'"format": {FORMAT_VERSION}', '"format": 7'))
    with pytest.raises(UserError, match="newer pipeline"):
        Store(store_copy)
