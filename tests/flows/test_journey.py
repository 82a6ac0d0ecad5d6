"""README's walkthrough ("Your own folder, end to end") at small size, as a researcher runs it on a class-ordered folder:
prepared shards, two teachers fitted here and extracted from their run folders into one store, a composite student
against scratch, a fine-tune from its weights with the GPD recipe, and the result loaded in plain timm with timm's own
transforms, agreeing with the tool's validation top-1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.settings.config import CONFIG_DIR

CLASSES = ("n01", "n02", "n03", "n04")
SMALL = ["--size", "32", "--batch-size", "16"]


def _photos(root, per_class: int, seed: int):
    """Class-ordered JPEGs of 64 x 48 whose colour says the class (learnable in an epoch or two), ImageNet's naming."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((48, 64, 3)) + [60 * c, 200 - 50 * c, 40 + 30 * c]
            pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{i:04d}.JPEG", quality=90)
    return root


def _last(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow  # the whole walkthrough, about half a minute
def test_the_walkthrough_runs_end_to_end(tmp_path):
    train, val = _photos(tmp_path / "train", 24, 0), _photos(tmp_path / "val", 6, 1)
    shards, store, runs = tmp_path / "shards", tmp_path / "cache", tmp_path / "runs"
    assert main(["--quiet", "prepare", "--data", f"folder:{train}", "--out", str(shards), "--shard-size", "24"]) == 0
    data = ["--data", f"wds:{shards}/train-{{000000..000003}}.tar"]
    val_data = ["--val-data", f"folder:{val}"]  # another kind than --data
    narrow = ["--model-arg", "channels=[8,16,32,64]"]
    assert (
        main(
            [
                "--quiet",
                "train",
                *data,
                *val_data,
                "--model",
                "resnet10t",
                *narrow,
                *SMALL,
                "--epochs",
                "2",
                "--out",
                str(runs / "t-r10"),
            ]
        )
        == 0
    )
    vit = [
        "--model-arg",
        "img_size=32",
        "--model-arg",
        "patch_size=8",
        "--model-arg",
        "depth=2",
        "--model-arg",
        "embed_dim=48",
        "--model-arg",
        "num_heads=2",
    ]
    assert (
        main(
            [
                "--quiet",
                "train",
                *data,
                *val_data,
                "--model",
                "vit_tiny_patch16_224",
                *vit,
                *SMALL,
                "--epochs",
                "2",
                "--out",
                str(runs / "t-vit"),
            ]
        )
        == 0
    )
    # the run folders are the teachers: architecture and arguments from their config.json
    for teacher in ("t-r10", "t-vit"):
        assert (
            main(
                [
                    "--quiet",
                    "extract",
                    *data,
                    "--teacher",
                    f"local-dir:{runs / teacher}",
                    "--size",
                    "32",
                    "--views",
                    "2",
                    "--block",
                    "24",
                    "--store",
                    str(store),
                ]
            )
            == 0
        )
    student = [
        "--from-cache",
        str(store),
        *val_data,
        "--student",
        "resnet10t",
        "--student-arg",
        "channels=[8,16,32,64]",
        *SMALL,
    ]
    assert (
        main(
            [
                "--quiet",
                "distill",
                *student,
                "--method",
                "kd@t-r10+dist@t-vit",
                "--epochs",
                "2",
                "--out",
                str(runs / "kd-dist"),
            ]
        )
        == 0
    )
    assert (
        main(["--quiet", "distill", *student, "--method", "ce", "--epochs", "2", "--out", str(runs / "scratch")]) == 0
    )
    config = json.loads((runs / "kd-dist" / "config.json").read_text())
    assert {t["id"] for t in config["provenance"]["teachers"]} == {"t-r10", "t-vit"} and "tag" not in config
    recipe = str(CONFIG_DIR / "gpd_finetune_r18.yaml")  # GPD's static teacher: one of the store's two
    assert (
        main(
            [
                "--quiet",
                "distill",
                *student,
                "--config",
                recipe,
                "--teacher-id",
                "t-r10",
                "--student-weights",
                str(runs / "kd-dist"),
                "--lr-base",
                "0.01",
                "--lr-base-size",
                "256",
                "--epochs",
                "1",
                "--out",
                str(runs / "ft"),
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in (runs / "ft" / "metrics.jsonl").read_text().splitlines()]
    # epoch 0: the weights it starts from
    assert [line["epoch"] for line in lines] == [0, 1] and lines[0]["val_top1"] == _last(runs / "kd-dist")["val_top1"]

    # Plain timm: the folder, timm's transforms from its pretrained config, the validation folder.
    model = timm.create_model(f"local-dir:{runs / 'ft'}", pretrained=True).eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    right = 0
    with torch.no_grad():
        for c, name in enumerate(CLASSES):
            for path in sorted((val / name).iterdir()):
                right += int(model(transform(Image.open(path).convert("RGB"))[None]).argmax(1).item() == c)
    total = 6 * len(CLASSES)
    assert abs(right / total - _last(runs / "ft")["val_top1"]) <= 1 / total + 1e-9  # to one image
