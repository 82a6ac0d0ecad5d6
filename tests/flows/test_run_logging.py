"""--log mlflow and --log wandb: the scalars of metrics.jsonl and the run's settings, where timm users look, offline."""

from __future__ import annotations

import json

import pytest
from conftest import STUDENT

from pipeline.cli import main


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_its_epochs_and_settings_to_mlflow_and_wandb(base_store, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    for key in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = {"init": [], "log": []}  # what reached wandb's own API (its offline .wandb file is read by its Go core only)
    init, log = wandb.init, wandb.sdk.wandb_run.Run.log

    def spy_init(**kwargs):
        seen["init"].append(kwargs)
        return init(**kwargs)

    def spy_log(self, data, step=None, **kwargs):
        seen["log"].append((step, dict(data)))
        return log(self, data, step=step, **kwargs)

    monkeypatch.setattr(wandb, "init", spy_init)
    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy_log)
    out = tmp_path / "runs" / "kd-a"
    assert (
        main(
            [
                "--quiet",
                "distill",
                "--from-cache",
                str(base_store),
                "--student",
                STUDENT["student"],
                "--student-arg",
                "channels=[8,16,32,64]",
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--lr",
                "0.003",
                "--log",
                "mlflow",
                "wandb",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lines = _lines(out)

    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "runs" / "mlruns").as_uri())  # the default store: beside the run folders
    (run,) = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert (
        run.info.run_name == "kd-a"
        and run.data.params["lr"] == "0.003"
        and run.data.params["student"] == STUDENT["student"]
    )
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [
        (line["epoch"], pytest.approx(line["train_loss"])) for line in lines
    ]

    (kwargs,) = seen["init"]
    assert kwargs["mode"] == "offline" and kwargs["name"] == "kd-a" and kwargs["config"]["lr"] == 0.003
    assert [(step, data["train/loss"]) for step, data in seen["log"]] == [
        (line["epoch"], line["train_loss"]) for line in lines
    ]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))  # written offline, for `wandb sync` later


def test_log_without_its_package_is_one_line_before_anything_is_made(base_store, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    assert (
        main(
            [
                "distill",
                "--from-cache",
                str(base_store),
                "--student",
                STUDENT["student"],
                "--epochs",
                "1",
                "--log",
                "wandb",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("error: --log: logging to wandb needs its package: pip install 'teacher-cache-pipeline[wandb]'")
        and not out.exists()
    )
