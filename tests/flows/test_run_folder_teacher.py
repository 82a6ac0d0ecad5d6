"""A model fitted by `pipeline train` on a researcher's own class-ordered folder, back in as a teacher.

The run folder is a timm model folder: `extract --teacher local-dir:RUN` reads its architecture, model arguments,
input size and normalisation from its config.json, and `--model-arg` rebuilds the same narrow model from a timm
name and the weights file. The folder's files are the same bytes for the same run, and say what is true of the
model (the user's data and classes), not timm's ImageNet weights of the architecture.
"""

from __future__ import annotations

import json

import pytest
import timm
from PIL import Image

from pipeline.cli import main
from stages.data.datasets import open_dataset
from stages.teachers.weight_files import file_sha256
from storage import Store

CLASSES = ("cat", "dog", "fox")
NARROW = ["--model-arg", "channels=[8,16,32,64]"]
TRAIN = ["train", "--model", "resnet10t", *NARROW, "--size", "32", "--epochs", "1", "--batch-size", "8", "--seed", "5"]


def run(*argv: str) -> int:
    return main(["--quiet", *argv])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three classes of eight small JPEGs, one sub-folder per class (ImageNet's layout: class-ordered)."""
    root = tmp_path_factory.mktemp("images")
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(8):
            Image.new("RGB", (40, 36), (90 * c, 20 + 25 * i, 200 - 60 * c)).save(
                root / name / f"{i:03d}.jpg", quality=90
            )
    return root


@pytest.fixture(scope="module")
def fitted(folder, tmp_path_factory):
    """A narrow resnet10t fitted by `pipeline train` (validated on the same folder, for the model card's figures)."""
    out = tmp_path_factory.mktemp("runs") / "narrow-teacher"
    assert run(*TRAIN, "--data", f"folder:{folder}", "--val-data", f"folder:{folder}", "--out", str(out)) == 0
    return out


def test_a_run_folder_is_a_teacher_and_its_cache_trains_a_student(folder, fitted, tmp_path):
    store, data = tmp_path / "store", f"folder:{folder}"
    assert (
        run(
            "extract",
            "--data",
            data,
            "--teacher",
            f"local-dir:{fitted}",
            "--store",
            str(store),
            "--views",
            "1",
            "--batch-size",
            "8",
        )
        == 0
    )
    info = Store(store).teacher_info("narrow-teacher")  # the default id: the folder's name
    assert (info.name, info.timm_name, info.input_size, info.num_classes) == (f"local-dir:{fitted}", "resnet10t", 32, 3)
    assert info.weights == f"sha256:{file_sha256(fitted / 'model.safetensors')}"
    assert tuple(info.mean) == tuple(timm.create_model(f"local-dir:{fitted}").pretrained_cfg["mean"])

    student = tmp_path / "student"
    assert (
        run(
            "distill",
            "--from-cache",
            str(store),
            "--student",
            "resnet10t",
            "--student-arg",
            "channels=[8,16,32,64]",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            str(student),
        )
        == 0
    )
    provenance = json.loads((student / "config.json").read_text())["provenance"]
    assert provenance["run"] == "distill" and provenance["store"] == str(store) and provenance["method"] == "kd"
    assert provenance["teachers"] == [
        {"id": "narrow-teacher", "name": f"local-dir:{fitted}", "timm_name": "resnet10t", "weights": info.weights}
    ]
    assert "`narrow-teacher` in the store" in (student / "README.md").read_text()


def test_a_timm_name_with_model_args_takes_the_run_folders_weights(folder, fitted, tmp_path, capsys):
    store, data, weights = tmp_path / "store", f"folder:{folder}", str(fitted / "model.safetensors")
    base = ["extract", "--data", data, "--store", str(store), "--views", "1", "--batch-size", "8"]
    capsys.readouterr()
    # without its arguments the model is resnet10t's default width
    assert run(*base, "--teacher", "resnet10t", "--weights", weights) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "do not fit teacher 'resnet10t'" in err[0]
    assert run(*base, "--teacher", "resnet10t", *NARROW, "--weights", weights) == 0
    info = Store(store).teacher_info("resnet10t")
    assert (
        info.model_args == {"channels": [8, 16, 32, 64]}
        and info.weights == f"sha256:{file_sha256(weights)}"
        and info.input_size == 32
    )
    assert "resnet10t, channels=[8, 16, 32, 64]" in next((store / "logs").glob("extract-resnet10t-*.log")).read_text()
    # A second extraction into the same teacher id must be built the same way.
    capsys.readouterr()
    assert (
        run(
            *base,
            "--teacher",
            "resnet10t",
            "--model-arg",
            "channels=[8,16,32,64]",
            "--model-arg",
            "drop_rate=0.1",
            "--weights",
            weights,
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds teacher 'resnet10t' with other model_args" in err[0]


def test_the_run_folder_says_what_is_true_of_the_model(folder, fitted):
    config = json.loads((fitted / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    for imagenet in ("tag", "license", "origin_url", "hf_hub_id", "paper_ids", "paper_name"):
        assert imagenet not in cfg and imagenet not in config
    dataset = open_dataset(f"folder:{folder}")
    provenance = config["provenance"]
    assert provenance["data"] == {"source": f"folder:{folder}", "fingerprint": dataset.fingerprint(), "samples": 24}
    assert (provenance["run"], provenance["method"], provenance["epochs"], provenance["seed"]) == ("train", "ce", 1, 5)
    assert "teachers" not in provenance and "store" not in provenance
    assert config["label_names"] == list(CLASSES) and config["model_args"]["channels"] == [8, 16, 32, 64]
    # timm's own loader builds the fitted model with its input settings.
    model = timm.create_model(f"local-dir:{fitted}", pretrained=True)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and model.num_classes == 3
    assert model.pretrained_cfg["label_names"] == list(CLASSES) and model.pretrained_cfg["interpolation"] == "bilinear"
    # The model card: where it came from and how it validated (final and best top-1 of metrics.jsonl).
    card = (fitted / "README.md").read_text()
    top1 = [json.loads(line)["val_top1"] for line in (fitted / "metrics.jsonl").read_text().splitlines()]
    assert f"| final | 1 | {100 * top1[-1]:.2f} % |" in card and f"| best | 1 | {100 * max(top1):.2f} % |" in card
    assert (
        "`pipeline train`" in card
        and f"`folder:{folder}`" in card
        and dataset.fingerprint() in card
        and "cat, dog, fox" in card
    )


def test_the_same_run_twice_writes_the_same_bytes(folder, fitted, tmp_path):
    again = tmp_path / "narrow-teacher"
    assert run(*TRAIN, "--data", f"folder:{folder}", "--val-data", f"folder:{folder}", "--out", str(again)) == 0
    for name in ("model.safetensors", "config.json", "README.md", "config.yaml"):
        assert (again / name).read_bytes() == (fitted / name).read_bytes(), name


def test_a_resumed_run_writes_the_bytes_of_an_uninterrupted_one(folder, tmp_path, monkeypatch):
    from stages.training.distill import loop as distill  # where train() looks validate up

    argv = [*TRAIN, "--epochs", "2", "--data", f"folder:{folder}", "--val-data", f"folder:{folder}"]
    assert run(*argv, "--out", str(tmp_path / "straight")) == 0
    real, calls = distill.validate, []

    def stop_in_epoch_two(*args, **kwargs):  # Ctrl-C after epoch 2's training: epoch 1's checkpoint is the last kept
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(distill, "validate", stop_in_epoch_two)
        assert run(*argv, "--out", str(tmp_path / "part")) == 130
    assert run(*argv, "--out", str(tmp_path / "part"), "--resume") == 0
    for name in ("model.safetensors", "config.json", "README.md", "config.yaml"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
