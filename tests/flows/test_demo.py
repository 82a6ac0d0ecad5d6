"""`pipeline demo`: every variant as README's Measurements section runs it.

Each variant writes to its own default folder (``runs/demo``, ``runs/demo-gpd``, ``runs/demo-kd+cospress``) and ends
with its table; a second run into a folder reuses the teacher and store that still match. One test per variant, so
that a parallel run (README's test command) spreads them over its workers. Tiny epochs: the
point is the flow, not the accuracy.
"""

from __future__ import annotations

import pytest
import timm
from safetensors.torch import load_file

from pipeline.settings import config
from pipeline.cli import main

FAST = ["--seeds", "1", "--epochs", "1", "--teacher-epochs", "1"]


# The default, GPD (its own section), and a composite whose parts read their own teachers: KD's and CosPress's (its
# own section, with a ViT teacher whose tokens are cached). CosPress alone is the composite's part and its row again.
VARIANTS = ["kd", "gpd", "kd+cospress"]


def test_the_demo_variants_cover_the_methods_with_their_own_sections():
    parts = {part for variant in VARIANTS for part in variant.split("+")}
    assert set(config.recipe("demo")["methods"]) <= parts


@pytest.mark.slow  # whole demos: the full run has them, the quick one leaves them out
@pytest.mark.parametrize("method", VARIANTS)
def test_every_demo_variant_runs_in_its_own_folder(method, tmp_path, monkeypatch, capsys):
    """The default as README runs it: part of the labels, with the all-label control rows. The other variants train
    with every label: their control rows would be the same code again, and each is a student run per row."""
    monkeypatch.chdir(tmp_path)
    variant = [] if method == "kd" else ["--method", method, "--label-fraction", "1"]
    assert main(["demo", *variant, *FAST]) == 0, method
    table = capsys.readouterr().out
    assert f"student distilled ({method}, cache)" in table and "student from scratch" in table, method
    folder = tmp_path / "runs" / ("demo" if method == "kd" else f"demo-{method}")
    parts = method.split("+")
    rows = 1 + len(parts) + (len(parts) > 1)  # scratch, each part alone, and the composite
    runs = 2 * rows if method == "kd" else rows  # partial labels and the control, or every label once
    assert (folder / "teacher" / "model.safetensors").is_file() and len(
        list(folder.glob("student-*/student.safetensors"))
    ) == runs
    VARIANT_CHECKS.get(method, lambda folder, table, capsys: None)(folder, table, capsys)


def _default(folder, table, capsys):
    assert "The teacher was trained on every label" in table
    # KD++ into the default folder: the same teacher and cache, so both are reused; its class means are added.
    # (All labels: no control rows, two student runs.)
    assert main(["demo", "--method", "kdpp", "--out", "runs/demo", *FAST, "--label-fraction", "1"]) == 0
    out, log = capsys.readouterr()
    assert "student distilled (kdpp, cache)" in out and "reused (" in out
    assert "reusing the teacher" in log and "replacing" not in log
    assert (folder / "store" / "stats" / "teacher").is_dir()


def _gpd(folder, table, capsys):
    for weights in folder.glob("student-gpd-*/student.safetensors"):  # plain resnet10t students
        timm.create_model("resnet10t", pretrained=False, num_classes=10, channels=(8, 16, 32, 64)).load_state_dict(
            load_file(weights)
        )


def _composite(folder, table, capsys):
    assert "student distilled (kd, cache)" in table and "student distilled (cospress, cache)" in table
    assert {p.name for p in (folder / "store" / "teachers").iterdir()} == {"teacher", "teacher-cospress"}
    assert (folder / "store" / "teachers" / "teacher-cospress" / "tokens").is_dir()
    assert "linear classifier trained on the detached features" in table


VARIANT_CHECKS = {"kd": _default, "gpd": _gpd, "kd+cospress": _composite}


def test_a_demo_teacher_or_store_made_with_other_settings_is_replaced_in_one_line(
    tmp_path, train_data, val_data, caplog
):
    """What the last demo step reuses must match: a teacher fitted with other settings is fitted again, and the store
    that cached the old one is replaced, each with a line saying so (on fake data, to stay cheap)."""
    import logging

    from pipeline.commands import demo_steps as demo
    from stages.data.views import ViewRecipe
    from stages.teachers.teachers import build_teacher
    from stages.training.settings import TrainSettings

    caplog.set_level(logging.INFO, logger="pipeline")
    recipe, cache = ViewRecipe(hflip=0.0), {"views": 1, "block": 32, "topk": 3}
    for epochs, says in ((1, None), (1, "reusing the teacher"), (2, "replacing the teacher")):
        caplog.clear()
        settings = TrainSettings(
            student="resnet10t",
            student_kwargs={"channels": [8, 16, 32, 64]},
            epochs=epochs,
            batch_size=32,
            size=32,
            method="ce",
        )
        demo.fitted_teacher(settings, train_data, val_data, recipe, tmp_path / "teacher")
        teacher = build_teacher(
            demo.teacher_name(settings), weights=str(tmp_path / "teacher" / "model.safetensors"), input_size=32
        )
        demo.cache_teachers({"teacher": teacher}, {}, train_data, recipe, cache, 32, tmp_path, (), 0)
        if says:
            assert says in caplog.text
        assert ("replacing the store" in caplog.text) == (epochs == 2)
