"""In-process runs keep OUT/checkpoint.pt: --resume continues them (after a kill too) to the very weights of an
uninterrupted run, with more epochs if asked; other changed settings, or no checkpoint, are one line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import STUDENT
from safetensors.torch import load_file

from pipeline.cli import main

STUDENT_FLAGS = ["--student", STUDENT["student"], "--student-arg", "channels=[8,16,32,64]"]
DISTILL = [
    "distill",
    *STUDENT_FLAGS,
    "--method",
    "kd",
    "--batch-size",
    "16",
    "--seed",
    "3",
    "--model-ema",
    "0.9",
    "--verify",
    "none",
]
TRAIN = [
    "train",
    "--data",
    "fake:96?size=32",
    "--model",
    STUDENT["student"],
    "--model-arg",
    "channels=[8,16,32,64]",
    "--size",
    "32",
    "--batch-size",
    "16",
    "--seed",
    "3",
    "--hflip",
    "0.5",
]


def _same_weights(a, b) -> None:
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _epochs(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _without_time(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k not in ("seconds", "views_per_s")} for line in lines]


def _stop_in_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C at the end of epoch ``epoch``'s training, before its checkpoint: the one before it is the last kept."""
    from stages.training.distill import loop as distill  # where train() looks validate up

    real, calls = distill.validate, []

    def validate(*args, **kwargs):
        calls.append(1)
        if len(calls) == epoch:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(distill, "validate", validate)


# kd: the student alone; srd: a method with a projector and BatchNorm of its own; gpd: a method that trains a
# widened network in the student's place; train: no store.
@pytest.mark.parametrize("command,method", [("distill", "kd"), ("distill", "srd"), ("distill", "gpd"), ("train", "ce")])
def test_a_stopped_run_resumes_to_the_weights_of_an_uninterrupted_one(
    command, method, base_store, tmp_path, monkeypatch, capsys
):
    argv = [*DISTILL, "--from-cache", str(base_store), "--method", method] if command == "distill" else TRAIN
    weights = ["student.safetensors", "ema/model.safetensors"] if command == "distill" else ["model.safetensors"]
    assert main(["--quiet", *argv, "--epochs", "3", "--out", str(tmp_path / "straight")]) == 0
    part = tmp_path / "part"
    with monkeypatch.context() as m:
        _stop_in_epoch(m, 2)
        assert main(["--quiet", *argv, "--epochs", "3", "--out", str(part)]) == 130
    assert "run the same command with --resume to continue" in capsys.readouterr().err.strip().splitlines()[-1]
    assert [line["epoch"] for line in _epochs(part)] == [1] and not (part / weights[0]).exists()
    assert main(["--quiet", *argv, "--epochs", "3", "--out", str(part), "--resume"]) == 0
    for name in weights:
        _same_weights(tmp_path / "straight" / name, part / name)
    assert _without_time(_epochs(part)) == _without_time(_epochs(tmp_path / "straight"))  # epochs 1, 2, 3, each once
    assert "resuming the run" in (part / "run.log").read_text()


def test_a_finished_run_resumes_to_more_epochs(base_store, tmp_path):
    argv = [*DISTILL, "--from-cache", str(base_store)]
    out = tmp_path / "run"
    assert main(["--quiet", *argv, "--epochs", "1", "--out", str(out)]) == 0
    first = _epochs(out)
    assert main(["--quiet", *argv, "--epochs", "3", "--out", str(out), "--resume"]) == 0  # the one change allowed
    lines = _epochs(out)
    assert [line["epoch"] for line in lines] == [1, 2, 3] and lines[0] == first[0]  # epoch 1 kept, not trained again


def test_resume_refuses_other_settings_and_a_missing_checkpoint_in_one_line(base_store, tmp_path, capsys):
    argv = [*DISTILL, "--from-cache", str(base_store), "--epochs", "1"]
    out = tmp_path / "run"
    assert main(["--quiet", *argv, "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: no checkpoint to resume in {tmp_path / 'none'} (no checkpoint.pt): run without --resume to start"
    ]
    assert main(["--quiet", *argv, "--out", str(out)]) == 0
    saved = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(["--quiet", *argv, "--out", str(out), "--resume", "--lr", "0.01", "--seed", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: --resume with other settings than the stopped run (lr, seed): pass the same settings (only --epochs may change), or drop --resume to start afresh"
    ]
    assert (out / "checkpoint.pt").read_bytes() == saved


def test_a_killed_run_resumes_from_its_last_finished_epoch(base_store, tmp_path):
    # small batches: many steps
    argv = [*DISTILL, "--from-cache", str(base_store), "--epochs", "4", "--batch-size", "4"]
    assert main(["--quiet", *argv, "--out", str(tmp_path / "straight")]) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "--quiet", *argv, "--out", str(out)], stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint.pt").is_file():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done = len(_epochs(out))
    assert done < 4, "the run finished before it could be killed"
    assert main(["--quiet", *argv, "--out", str(out), "--resume"]) == 0
    _same_weights(tmp_path / "straight" / "student.safetensors", out / "student.safetensors")
    assert [line["epoch"] for line in _epochs(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("command", ["distill", "train"])
def test_a_fresh_run_replaces_an_earlier_runs_checkpoint(command, base_store, tmp_path):
    argv = [*DISTILL, "--from-cache", str(base_store)] if command == "distill" else TRAIN
    out = tmp_path / "run"
    assert main(["--quiet", *argv, "--epochs", "2", "--out", str(out)]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert main(["--quiet", *argv, "--epochs", "1", "--out", str(out)]) == 0  # no --resume: start afresh
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_resume_on_changed_data_or_with_fewer_epochs_than_done_is_one_line_and_changes_nothing(
    base_store, tmp_path, capsys
):
    from PIL import Image

    folder = tmp_path / "images"
    for c in range(2):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(16):
            Image.new("RGB", (40, 30), (120 * c, 8 * i, 60)).save(folder / f"class{c}" / f"{i}.png")
    out = tmp_path / "run"
    argv = [
        "--quiet",
        "train",
        "--data",
        f"folder:{folder}",
        "--val-data",
        f"folder:{folder}",
        "--model",
        STUDENT["student"],
        "--model-arg",
        "channels=[8,16,32,64]",
        "--size",
        "32",
        "--batch-size",
        "16",
        "--out",
        str(out),
    ]
    assert main([*argv, "--epochs", "2"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    assert main([*argv, "--epochs", "1", "--resume"]) == 2  # a finished 2-epoch run cannot go back to 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has finished 2 epochs already; pass --epochs 3 or more" in err[0], err

    Image.new("RGB", (40, 30)).save(folder / "class1" / "added.png")  # the data changed under the run
    assert main([*argv, "--epochs", "3", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume on other training data than the stopped run's" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def _folder(root, classes=("cat", "dog", "eel"), per_class=12, size=32):
    """A class-ordered folder of small JPEGs (class by class, as ImageNet lists its images)."""
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (size + i, size), (80 * c, 7 * i, 255 - 80 * c)).save(
                root / name / f"{i:03d}.jpg", quality=90
            )
    return root


def test_a_validation_image_that_cannot_be_read_is_refused_at_set_up_and_one_that_fails_late_keeps_the_epoch(
    tmp_path, capsys
):
    train, val = _folder(tmp_path / "train"), _folder(tmp_path / "val", per_class=4)
    argv = [
        "--quiet",
        "train",
        "--data",
        f"folder:{train}",
        "--val-data",
        f"folder:{val}",
        "--model",
        "resnet10t",
        "--model-arg",
        "channels=[8,16,32,64]",
        "--size",
        "32",
        "--batch-size",
        "16",
        "--epochs",
        "2",
    ]
    import io

    import numpy as np
    from PIL import Image

    noisy = io.BytesIO()  # noise: the pixel data, not the header, is most of the file
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(
        noisy, "JPEG", quality=90
    )
    good = noisy.getvalue()
    (val / "dog" / "001.jpg").write_bytes(b"not an image at all")
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "001.jpg" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # refused at set-up: nothing created
    huffman = good.index(b"\xff\xc4")  # its header and its end read; its Huffman table, and so its pixels, do not
    (val / "dog" / "001.jpg").write_bytes(good[: huffman + 5] + b"\xff" * 16 + good[huffman + 21 :])
    assert main([*argv, "--out", str(tmp_path / "b")]) == 2
    assert "001.jpg" in capsys.readouterr().err
    # the epoch trained before validation failed is kept
    assert [line["epoch"] for line in _epochs(tmp_path / "b")] == [1]
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    (val / "dog" / "001.jpg").write_bytes(good)
    assert main([*argv, "--out", str(tmp_path / "b"), "--resume"]) == 0  # and the run goes on from it
    assert [line["epoch"] for line in _epochs(tmp_path / "b")] == [1, 2]


def test_a_fine_tune_evaluates_its_starting_weights_as_epoch_0_and_resumes_with_it(tmp_path, capsys):
    train, val = _folder(tmp_path / "train"), _folder(tmp_path / "val", per_class=4)
    base = [
        "--quiet",
        "train",
        "--data",
        f"folder:{train}",
        "--val-data",
        f"folder:{val}",
        "--model",
        STUDENT["student"],
        "--model-arg",
        "channels=[8,16,32,64]",
        "--size",
        "32",
        "--batch-size",
        "12",
    ]
    assert main([*base, "--epochs", "1", "--out", str(tmp_path / "fit")]) == 0
    fitted = _epochs(tmp_path / "fit")[-1]["val_top1"]
    tune = [*base, "--model-weights", str(tmp_path / "fit" / "model.safetensors"), "--out", str(tmp_path / "tune")]
    assert main([*tune, "--epochs", "1"]) == 0
    lines = _epochs(tmp_path / "tune")
    # the weights as they came
    assert [line["epoch"] for line in lines] == [0, 1] and lines[0] == {"epoch": 0, "val_top1": fitted}
    assert main([*tune, "--epochs", "2", "--resume"]) == 0
    assert [line["epoch"] for line in _epochs(tmp_path / "tune")] == [0, 1, 2]
