"""Runs a person can look at: RunMetrics writes metrics.jsonl and TensorBoard scalars, `pipeline report` draws and tabulates runs."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from pipeline import cli

from pipeline.runs import plots
from stages.training.run_metrics import RunMetrics, read_metrics, scalar_tag
from storage import UserError


def _line(epoch: int, loss: float, top1: float) -> dict:
    return {
        "epoch": epoch,
        "train_loss": loss,
        "train_ce": loss / 2,
        "train_kd": loss / 2,
        "lr": 0.001 / epoch,
        "seconds": 1.5,
        "views_per_s": 400.0,
        "val_top1": top1,
    }


def _run(folder, lines):
    with RunMetrics(folder) as m:
        for line in lines:
            m.write(line)
    return folder


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """What tensorboard shows for a run folder: every scalar tag with its (step, value) points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_metrics_lines_go_to_jsonl_and_tensorboard_as_grouped_scalars(tmp_path):
    lines = [_line(1, 2.0, 0.3), _line(2, 1.5, 0.5), _line(3, 1.0, 0.6)]
    _run(tmp_path, lines)
    assert read_metrics(tmp_path) == lines
    scalars = _scalars(tmp_path)
    assert set(scalars) == {"train/loss", "train/ce", "train/kd", "lr", "seconds", "views_per_s", "val/top1"}
    assert [s for s, _ in scalars["val/top1"]] == [1, 2, 3]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([2.0, 1.5, 1.0])
    assert [v for _, v in scalars["lr"]] == pytest.approx([0.001, 0.0005, 0.001 / 3])


def test_a_new_run_in_the_same_folder_starts_its_record_afresh(tmp_path):
    _run(tmp_path, [_line(1, 2.0, 0.3), _line(2, 1.5, 0.5)])
    _run(tmp_path, [_line(1, 9.0, 0.1)])
    assert read_metrics(tmp_path) == [_line(1, 9.0, 0.1)]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    assert _scalars(tmp_path)["train/loss"] == [(1, 9.0)]


def test_run_metrics_of_none_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with RunMetrics(None) as m:
        m.write(_line(1, 2.0, 0.3))
    assert list(tmp_path.iterdir()) == []


def test_tags_and_a_torn_last_line(tmp_path):
    assert [scalar_tag(k) for k in ("train_loss", "val_top1_ema", "lr", "views_per_s", "train")] == [
        "train/loss",
        "val/top1_ema",
        "lr",
        "views_per_s",
        "train",
    ]
    (tmp_path / "metrics.jsonl").write_text(json.dumps(_line(1, 2.0, 0.3)) + '\n{"epoch": 2, "train_lo')  # a killed run
    assert read_metrics(tmp_path) == [_line(1, 2.0, 0.3)]


def _curves(tmp_path):
    runs = []
    for kind, top in (("scratch", 0.6), ("distilled", 0.8)):
        for seed in range(2):
            lines = [_line(e, 2.3 * math.exp(-e / 3), top * (1 - math.exp(-e / 2)) + 0.01 * seed) for e in range(1, 7)]
            runs.append(_run(tmp_path / "demo" / f"student-{kind}-seed{seed}", lines))
    return runs


def test_report_prints_final_numbers_and_draws_the_runs(tmp_path, capsys):
    runs = _curves(tmp_path)
    png = tmp_path / "report.png"
    assert cli.main(["report", str(runs[0]), str(runs[2]), "--out", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["run", "epochs", "train", "loss"]
    scratch = next(ln for ln in out if ln.startswith("student-scratch-seed0")).split()
    assert scratch[1] == "6" and scratch[3] == f"{0.6 * (1 - math.exp(-3)):.4g}"  # epochs, last val top-1
    assert out[-1].endswith(str(png))
    image = Image.open(png)
    assert image.format == "PNG" and image.size[0] > image.size[1] > 300  # two panels side by side


def test_a_folder_of_runs_stands_for_all_of_them_and_labels_group_colours(tmp_path, capsys):
    runs = _curves(tmp_path)
    assert cli.main(["report", str(tmp_path / "demo"), "--out", str(tmp_path / "all.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith("student-") for ln in table) == 4
    labels = ["scratch", "scratch", "distilled", "distilled"]
    assert plots._colours(labels) == {
        "scratch": plots._colours(["scratch"])["scratch"],
        "distilled": plots._colours(["x", "distilled"])["distilled"],
    }
    assert plots.plot_runs(
        [runs[0], runs[1], runs[2], runs[3]], tmp_path / "demo.png", labels=labels, title="t"
    ).is_file()


@pytest.mark.parametrize("case", ["no_metrics", "missing", "labels"])
def test_bad_report_input_is_one_line(tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    run = _run(tmp_path / "run", [_line(1, 2.0, 0.3)])
    argv = {
        "no_metrics": ["report", str(tmp_path / "empty")],
        "missing": ["report", str(tmp_path / "nowhere")],
        "labels": ["report", str(run), "--label", "a", "--label", "b"],
    }[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert {"no_metrics": "holds no metrics.jsonl", "missing": "not found", "labels": "one --label per RUN"}[
        case
    ] in err[0]


def test_a_teacher_does_not_squeeze_the_students_and_a_one_epoch_run_shows(tmp_path):
    """A teacher fitted by `pipeline train` is a reference: a dashed level, or a note when it sits far above the
    students, whose range keeps the axis; runs that share a name differ by line style; one epoch is a big marker."""
    from matplotlib.figure import Figure

    from pipeline.settings import config

    from pipeline.runs import plots
    from stages.training.run_metrics import RunMetrics

    def run(name, tops, command):
        with RunMetrics(tmp_path / name) as m:
            for epoch, top in enumerate(tops, 1):
                m.write({"epoch": epoch, "train_loss": 1.0 / epoch, "val_top1": top})
        config.save(tmp_path / name / "config.yaml", {"command": command})
        return tmp_path / name

    teacher = run("teacher", [0.5, 0.82], "train")
    students = [run(f"s{i}", [0.08 + 0.01 * i, 0.1 + 0.01 * i], "distill") for i in range(8)] + [
        run("one", [0.15], "distill")
    ]
    assert plots.is_reference(teacher) and not plots.is_reference(students[0])
    plots.plot_runs([teacher, *students], tmp_path / "r.png", labels=["teacher"] + ["kd"] * 8 + ["one epoch"])
    assert (tmp_path / "r.png").stat().st_size > 0
    ax = Figure().subplots()
    for s in students:
        ax.plot([1, 2], [10, 18])
    plots._reference_level(ax, [{"epoch": 2, "val_top1": 0.82}], "teacher", "red")
    assert ax.get_ylim()[1] < 50 and any("82.0% (above)" in t.get_text() for t in ax.texts)
    plots._reference_level(ax, [{"epoch": 2, "val_top1": 0.2}], "near", "blue")
    assert any(line.get_ydata()[0] == 20.0 for line in ax.get_lines() if line.get_linestyle() == "--")


def test_lines_that_are_not_epoch_lines_are_skipped_and_said(tmp_path, capsys):
    """``"epoch": "one"`` and garbage between epoch lines: the report reads the rest, names the skipped lines in one
    line, and does not fail; a metrics.jsonl of nothing else is refused as such, not called empty."""
    run = tmp_path / "run"
    run.mkdir()
    good = [_line(1, 2.0, 0.3), _line(2, 1.5, 0.5)]
    # torn last
    rows = [
        json.dumps(good[0]),
        json.dumps({**good[1], "epoch": "one"}),
        "garbage {",
        json.dumps(good[1]),
        '{"epoch": 3, "train_lo',
    ]
    (run / "metrics.jsonl").write_text("\n".join(rows))
    capsys.readouterr()
    assert cli.main(["report", str(run), "--out", str(tmp_path / "r.png")]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err and (tmp_path / "r.png").is_file()
    row = out.splitlines()[1].split()  # the table's one row, under its header
    assert row[1] == "2" and row[3] == "0.5"  # epochs, val top-1 of the last epoch line
    warned = [line for line in err.strip().splitlines() if "skipped" in line]
    assert (
        len(warned) == 1
        and "metrics.jsonl: skipped 2 line(s) that are not epoch lines" in warned[0]
        and "line 2, 3" in warned[0]
    )

    (run / "metrics.jsonl").write_text('{"epoch": "one"}\nnot json\n[1, 2]\n')
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no epoch line in ") and "not epoch lines" in err[-1] and "empty" not in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_runs_of_another_task_are_left_out_and_said(tmp_path, capsys):
    """Runs that classify other classes (another dataset, another class count) are not drawn on the same axes:
    one line each says which and why, and the table and picture hold the rest."""

    def run(name, classes, store=None):
        folder = _run(tmp_path / name, [_line(1, 2.0, 0.3), _line(2, 1.5, 0.5)])
        if store is None:
            (folder / "config.json").write_text(
                json.dumps({"architecture": "resnet10t", "num_classes": len(classes), "label_names": classes})
            )
        else:  # an unfinished run: what it classifies comes from its store
            (tmp_path / store).mkdir(exist_ok=True)
            (tmp_path / store / "store.json").write_text(
                json.dumps({"dataset": {"num_classes": len(classes), "classes": classes}})
            )
            from pipeline.settings import config

            config.save(folder / "config.yaml", {"command": "distill", "job": {"store": str(tmp_path / store)}})
        return folder

    digits = [str(i) for i in range(10)]
    runs = [
        run("a", digits),
        run("b", digits),
        run("c", [f"n{i}" for i in range(100)]),
        run("d", digits, store="s1"),
        run("e", [f"class{i}" for i in range(10)], store="s2"),
    ]
    capsys.readouterr()
    assert cli.main(["report", *map(str, runs), "--out", str(tmp_path / "r.png")]) == 0
    out, err = capsys.readouterr()
    table = [line.split()[0] for line in out.splitlines()[1:] if not line.startswith("picture")]
    assert table == ["a", "b", "d"]
    left = [line for line in err.strip().splitlines() if "left out" in line]
    assert len(left) == 2
    assert (
        "left out c (" in left[0]
        and "it classifies 100 classes (n0, n1, n2, ...), the other runs 10 classes (0, 1, 2, ...)" in left[0]
    )
    assert "left out e (" in left[1] and "10 classes (class0, class1, class2, ...)" in left[1]
    assert "picture: training loss and validation top-1 of 3 run(s)" in out


@pytest.mark.parametrize("target", ["metrics.jsonl", "notes.png", "sub.png", "file.png/r.png", "picture"])
def test_out_never_writes_over_a_file_it_did_not_make(tmp_path, capsys, target):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"epoch": 1, "train_loss": 2.0, "val_top1": 0.5})]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "notes.png").write_text("not a picture")
    (run / "sub.png").mkdir()
    (run / "file.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert cli.main(["report", str(run), "--out", str(run / target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("error: --out" in err[0] or "cannot write the picture" in err[0]), err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert cli.main(["report", str(run), "--out", str(run / "file.png")]) == 0  # an earlier picture is replaced


def test_a_library_callers_bad_value_is_a_user_error(tmp_path):
    from stages.training.run_metrics import best_line

    with pytest.raises(UserError, match="mode must be max or min, not 'best'"):
        best_line([{"epoch": 1, "val_top1": 0.5}], "val_top1", mode="best")
    with pytest.raises(UserError, match="loggers tensorboard: known are mlflow, wandb"):
        RunMetrics(tmp_path / "run", loggers=("tensorboard",))
    with pytest.raises(UserError, match="holds no metrics.jsonl"):
        plots.plot_runs([tmp_path], tmp_path / "r.png")
