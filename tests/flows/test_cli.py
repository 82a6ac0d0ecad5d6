"""The command line as a user drives it: the issue's command sequence, and every bad input ending in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pipeline.cli import main

DATA = "fake:96?size=32"
TINY_STUDENT = ["--student", "resnet10t", "--student-arg", "channels=[8,16,32,64]"]


def run(*argv: str) -> int:
    return main(["--quiet", *argv])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("error: ")
    return err[0]


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A resnet18 teacher fitted for one epoch by `pipeline train` (its file carries size and normalisation)."""
    out = tmp_path_factory.mktemp("teacher")
    assert (
        run(
            "train",
            "--data",
            DATA,
            "--model",
            "resnet18",
            "--epochs",
            "1",
            "--size",
            "32",
            "--batch-size",
            "32",
            "--out",
            str(out),
        )
        == 0
    )
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def exact_store(tmp_path_factory, teacher_file) -> Path:
    store = tmp_path_factory.mktemp("stores") / "exact"
    argv = ["extract", "--data", DATA, "--teacher", "resnet18", "--weights", str(teacher_file), "--views", "2"]
    assert (
        run(
            *argv,
            "--store",
            str(store),
            "--block",
            "32",
            "--logits",
            "full",
            "--dtype",
            "float32",
            "--batch-size",
            "32",
        )
        == 0
    )
    return store


def test_train_writes_weights_with_their_input_size(teacher_file):
    from safetensors import safe_open

    with safe_open(str(teacher_file), "pt") as f:
        meta = f.metadata()
    assert meta["input_size"] == "32" and json.loads(meta["mean"]) == [0.485, 0.456, 0.406]
    mask = os.umask(0)
    os.umask(mask)
    assert teacher_file.stat().st_mode & 0o777 == 0o666 & ~mask  # readable by the team as any file the user makes


def test_cache_and_online_give_the_same_student(tmp_path, exact_store, teacher_file):
    """The invariant through the real command line: a full float32 cache replaces the live teacher exactly."""
    common = [*TINY_STUDENT, "--method", "kd", "--epochs", "2", "--batch-size", "32", "--seed", "3", "--verify", "all"]
    assert run("distill", "--from-cache", str(exact_store), *common, "--out", str(tmp_path / "cache")) == 0
    online = ["--online", "--teacher", "resnet18", "--weights", str(teacher_file)]
    assert run("distill", "--from-cache", str(exact_store), *online, *common, "--out", str(tmp_path / "online")) == 0
    a, b = load_file(tmp_path / "cache" / "student.safetensors"), load_file(tmp_path / "online" / "student.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(line) for line in (tmp_path / "cache" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all(0.0 <= m["val_top1"] <= 1.0 for m in metrics)
    assert (tmp_path / "cache" / "config.yaml").read_text().count("method: kd") == 1
    assert (tmp_path / "cache" / "run.log").stat().st_size > 0


def test_more_views_append_and_a_second_teacher_shares_the_plan(tmp_path, teacher_file):
    store = tmp_path / "store"
    base = ["extract", "--data", DATA, "--weights", str(teacher_file), "--store", str(store), "--block", "32"]
    assert run(*base, "--teacher", "resnet18", "--views", "1") == 0
    first = zarr_copy(store / "teachers" / "resnet18" / "topk_logp")
    assert run(*base, "--teacher", "resnet18", "--views", "2") == 0
    grown = zarr_copy(store / "teachers" / "resnet18" / "topk_logp")
    assert grown.shape[0] == 2 and (grown[:1] == first).all()
    assert run(*base, "--teacher", "resnet18", "--teacher-id", "again", "--views", "2") == 0
    assert (zarr_copy(store / "teachers" / "again" / "topk_logp") == grown).all()
    assert (
        run(
            "distill",
            "--from-cache",
            str(store),
            "--teacher-id",
            "again",
            *TINY_STUDENT,
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--out",
            str(tmp_path / "s"),
        )
        == 0
    )


def zarr_copy(path: Path):
    import zarr

    return zarr.open_array(str(path), mode="r")[:]


# -- bad input: one line, exit 2, nothing committed ------------------------------------------


def test_unknown_teacher_suggests_close_names(tmp_path, capsys):
    assert (
        run(
            "extract",
            "--data",
            DATA,
            "--teacher",
            "resnet19",
            "--random-init",
            "--views",
            "1",
            "--store",
            str(tmp_path / "s"),
        )
        == 2
    )
    line = error_line(capsys)
    assert "unknown teacher 'resnet19'" in line and "resnet18" in line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("content", [None, b"not a checkpoint at all"], ids=["missing", "unreadable"])
def test_missing_or_unreadable_weights(tmp_path, capsys, content):
    weights = tmp_path / "teacher.safetensors"
    if content is not None:
        weights.write_bytes(content)
    assert (
        run(
            "extract",
            "--data",
            DATA,
            "--teacher",
            "resnet18",
            "--weights",
            str(weights),
            "--views",
            "1",
            "--store",
            str(tmp_path / "s"),
        )
        == 2
    )
    assert str(weights) in error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_weights_that_do_not_fit_the_model(tmp_path, capsys):
    weights = tmp_path / "small.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(weights))
    assert (
        run(
            "extract",
            "--data",
            DATA,
            "--teacher",
            "resnet18",
            "--weights",
            str(weights),
            "--views",
            "1",
            "--store",
            str(tmp_path / "s"),
        )
        == 2
    )
    assert "do not fit teacher 'resnet18'" in error_line(capsys)


def test_class_count_mismatch(tmp_path, capsys):
    weights = tmp_path / "five.safetensors"
    save_file(timm.create_model("resnet18", num_classes=5).state_dict(), str(weights))
    store = tmp_path / "s"
    assert (
        run(
            "extract",
            "--data",
            DATA,
            "--teacher",
            "resnet18",
            "--weights",
            str(weights),
            "--size",
            "32",
            "--views",
            "1",
            "--store",
            str(store),
        )
        == 2
    )
    assert "predicts 5 classes but the dataset has 10" in error_line(capsys)
    assert not store.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_gpu_asked_for_where_there_is_none(tmp_path, capsys):
    argv = [
        "extract",
        "--data",
        DATA,
        "--teacher",
        "resnet18",
        "--random-init",
        "--views",
        "1",
        "--store",
        str(tmp_path / "s"),
    ]
    assert run(*argv, "--device", "cuda") == 2
    assert "no CUDA GPU is visible" in error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_from_cache_pointing_at_nothing(tmp_path, capsys):
    assert run("distill", "--from-cache", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")) == 2
    assert "no store at" in error_line(capsys)


def test_store_from_another_dataset_or_plan(tmp_path, capsys, exact_store):
    assert (
        run("distill", "--from-cache", str(exact_store), "--data", "fake:64?size=32", "--out", str(tmp_path / "o")) == 2
    )
    assert "was made from dataset" in error_line(capsys)
    argv = [
        "extract",
        "--data",
        DATA,
        "--teacher",
        "resnet18",
        "--random-init",
        "--size",
        "32",
        "--views",
        "1",
        "--store",
        str(exact_store),
    ]
    assert run(*argv, "--plan-seed", "7") == 2
    assert "view plan seed 0" in error_line(capsys)
    assert run(*argv[:2], "digits", *argv[3:]) == 2
    assert "was made from dataset" in error_line(capsys)


def test_unreadable_image_in_folder_dataset(tmp_path, capsys):
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 24), (40 * i, 80, 120)).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "b" / "broken.png").write_bytes(b"\x89PNG but not really")
    argv = [
        "extract",
        "--data",
        f"folder:{tmp_path / 'data'}",
        "--teacher",
        "resnet18",
        "--random-init",
        "--size",
        "32",
    ]
    assert run(*argv, "--views", "1", "--store", str(tmp_path / "s")) == 2
    assert "broken.png" in error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_truncated_image_found_while_rendering_in_a_worker(tmp_path, capsys):
    """A file whose header reads but whose pixels do not fails in a loader worker; still one line."""
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20, 24), (40 * i, 80, 120)).save(tmp_path / "data" / c / f"{i}.png")
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "data" / "a" / "cut.png")
    data = (tmp_path / "data" / "a" / "cut.png").read_bytes()
    (tmp_path / "data" / "a" / "cut.png").write_bytes(data[: len(data) // 2])
    argv = [
        "extract",
        "--data",
        f"folder:{tmp_path / 'data'}",
        "--teacher",
        "resnet18",
        "--random-init",
        "--size",
        "32",
    ]
    assert run(*argv, "--views", "1", "--workers", "1", "--store", str(tmp_path / "s")) == 2
    assert "cut.png" in error_line(capsys)
    assert not list((tmp_path / "s").glob("teachers/*/commits/*.json"))


def test_errors_have_no_traceback_unless_debug(tmp_path):
    """The installed command, as a user runs it: one line and exit 2; --debug shows the traceback."""
    argv = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "distill",
        "--from-cache",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "o"),
    ]
    plain = subprocess.run(argv, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: no store at")
    debug = subprocess.run(argv[:3] + ["--debug"] + argv[3:], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_every_flag_is_explained_with_its_default():
    from pipeline.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(commands) == {
        "demo",
        "prepare",
        "train",
        "extract",
        "verify",
        "inspect",
        "stats",
        "distill",
        "sweep",
        "report",
    }
    for name, parser in commands.items():
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
            if not action.required and action.option_strings[0] not in ("--out", "--config"):
                assert "default:" in action.help, f"{name} {action.option_strings[0]} does not say its default"


def test_extract_and_store_commands_share_one_vocabulary_from_the_registries():
    """--teacher is a model to run, --teacher-id a teacher in a store, --teacher-seed the teacher's seed;
    --format, the teacher names and the dataset kinds come from their registries."""
    from pipeline.cli import build_parser
    from stages.data.datasets import list_datasets
    from stages.teachers.teachers import list_teachers
    from storage import list_backends

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    extract = {a.option_strings[0]: a for a in commands["extract"]._actions if a.option_strings}
    assert extract["--format"].choices == list_backends()
    assert all(name in extract["--teacher"].help for name in list_teachers())
    assert all(kind in extract["--data"].help for kind in list_datasets())
    assert "--teacher-seed" in extract and "--seed" not in extract
    for name in ("verify", "inspect", "stats"):
        flags = {s for a in commands[name]._actions for s in a.option_strings}
        assert "--teacher-id" in flags and "--teacher" not in flags, name
