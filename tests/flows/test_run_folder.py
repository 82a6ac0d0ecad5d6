"""A run's folder: two runs into one --out (the second refused in one line, nothing changed), and a full disk under it."""

from __future__ import annotations

import json
import os
import socket
import time

from conftest import BATCH, read_tree
from pipeline.cli import main

STUDENT = [
    "--student",
    "resnet10t",
    "--student-arg",
    "channels=[8,16,32,64]",
    "--epochs",
    "1",
    "--batch-size",
    str(BATCH),
]


def _held_by_a_live_process(folder) -> None:
    """The lock file a running distill leaves in its folder (our parent process stands in for that run: it is alive)."""
    record = {
        "host": socket.gethostname(),
        "pid": os.getppid(),
        "token": "other",
        "started": time.time(),
        "heartbeat": time.time(),
    }
    (folder / "run.lock").write_text(json.dumps(record))


def test_a_second_run_into_a_busy_folder_is_one_line_and_changes_nothing(base_store, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--quiet", "distill", "--from-cache", str(base_store), *STUDENT, "--out", str(out)]) == 0
    _held_by_a_live_process(out)
    before = read_tree(out)
    capsys.readouterr()
    assert main(["--quiet", "distill", "--from-cache", str(base_store), *STUDENT, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"run folder {out} is in use by process {os.getppid()}" in err[0]
    assert read_tree(out) == before  # the first run's weights, config and metrics untouched
    # A holder that is gone frees the folder at once.
    lock = json.loads((out / "run.lock").read_text())
    (out / "run.lock").write_text(json.dumps({**lock, "pid": 2**22 + 12345}))
    assert main(["--quiet", "distill", "--from-cache", str(base_store), *STUDENT, "--out", str(out)]) == 0
    assert not (out / "run.lock").exists()


def test_a_full_disk_during_distill_is_one_line(base_store, tmp_path, capsys):
    """A run folder on a 300 KiB tmpfs: the first checkpoint does not fit. One line naming the cause, exit 2."""
    import subprocess

    import pytest

    disk = tmp_path / "disk"
    disk.mkdir()
    if (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        capsys.readouterr()
        assert main(["--quiet", "distill", "--from-cache", str(base_store), *STUDENT, "--out", str(disk / "run")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: no space left on device") and "Traceback" not in err[0]
        assert not (disk / "run" / "student.safetensors").exists()
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_run_into_a_folder_holding_another_kind_of_model_is_one_line(base_store, tmp_path, capsys):
    """A run folder is a timm model folder: `train` into a distill run's folder would leave two weights files, and
    timm's loader would pick the other one."""
    out = tmp_path / "run"
    assert main(["--quiet", "distill", "--from-cache", str(base_store), *STUDENT, "--out", str(out)]) == 0
    before = read_tree(out)
    capsys.readouterr()
    argv = [
        "--quiet",
        "train",
        "--data",
        "fake:80?size=32",
        "--model",
        "resnet10t",
        "--model-arg",
        "channels=[8,16,32,64]",
        "--epochs",
        "1",
        "--size",
        "32",
        "--batch-size",
        str(BATCH),
        "--out",
        str(out),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another run's model (student.safetensors)" in err[0]
    assert read_tree(out) == before


def test_a_student_that_cannot_take_the_views_size_is_refused_at_set_up_and_nothing_is_created(
    base_store, tmp_path, capsys
):
    # A ViT built for 224 px given the store's 32 px views: one line before the run folder exists, not a traceback an epoch in.
    argv = [
        "distill",
        "--from-cache",
        str(base_store),
        "--student",
        "vit_tiny_patch16_224",
        "--student-arg",
        "depth=1",
        "--epochs",
        "1",
        "--batch-size",
        str(BATCH),
    ]
    assert main(["--quiet", *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "student vit_tiny_patch16_224 cannot take 32 px inputs" in err[0] and "img_size=32" in err[0]
    ), err
    assert not (tmp_path / "run").exists()
    # built for 32 px, it trains
    assert main(["--quiet", *argv, "--student-arg", "img_size=32", "--out", str(tmp_path / "run")]) == 0
