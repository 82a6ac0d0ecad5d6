"""A training run's epoch lines: appended to ``OUT/metrics.jsonl`` and written as TensorBoard scalars beside it.

Every training loop (``train``, ``distill``, sweep trials, the Ray Train
driver) writes its epoch lines through ``RunMetrics``, so ``tensorboard
--logdir runs/`` shows every run, and ``pipeline report`` and ``pipeline
sweep`` read the same ``metrics.jsonl``. A line looks like
``{"epoch": 1, "train_loss": 2.1, "train_ce": 1.2, "train_kd": 0.9, "lr": 0.001,
"seconds": 3.2, "views_per_s": 400.0, "val_top1": 0.5}``; its numbers become
the scalars ``train/loss``, ``train/ce``, ``train/kd``, ``lr``, ``seconds``,
``views_per_s`` and ``val/top1`` at step ``epoch``.

``--log mlflow`` and ``--log wandb`` (the settings' ``log``) send the same scalars, and the run's settings as
parameters, where timm users look too: MLflow (``MLFLOW_TRACKING_URI``, else a file store ``mlruns/`` beside the
run folder, shared by the runs of one parent folder as ``tensorboard --logdir`` is) and Weights & Biases (offline
into ``OUT/wandb`` unless ``WANDB_API_KEY`` or ``WANDB_MODE`` says otherwise). Both are optional extras.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from storage import UserError

METRICS_FILE = "metrics.jsonl"
LOGGERS = ("mlflow", "wandb")  # --log choices: the package each needs has the same name
EVENTS_GLOB = "events.out.tfevents.*"
_GROUPS = ("train", "val")  # key prefixes that become TensorBoard groups: train_loss -> train/loss

__all__ = ["RunMetrics", "read_metrics", "best_line", "scalar_tag", "METRICS_FILE", "LOGGERS"]


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of a metrics key: ``train_loss`` -> ``train/loss``, ``val_top1`` -> ``val/top1``, ``lr`` -> ``lr``.

    Args:
        key: a key of an epoch line.

    Returns:
        The tag its scalar is written under.
    """
    group, sep, rest = key.partition("_")
    return f"{group}/{rest}" if sep and rest and group in _GROUPS else key


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class RunMetrics:
    """Writes a run's epoch lines; ``RunMetrics(None)`` writes nothing (a DDP rank other than 0, a timing run).

    Opening one starts the run's record afresh: ``metrics.jsonl`` is emptied and
    older TensorBoard event files in the folder are removed, so a stale line or
    curve never passes for this run's. Each line is appended and flushed at
    once: a killed run keeps every epoch it finished.

    Args:
        out_dir: the run folder (created if missing), or None to write nothing.
        loggers: the extra trackers to send the same scalars to, of ``LOGGERS`` (``mlflow``, ``wandb``); each
            needs its package installed.
        params: the run's settings, sent to those trackers as parameters (nested ones flattened:
            ``method_args.temperature``).

    Example:
        >>> with RunMetrics("runs/mine") as metrics:
        ...     for epoch in range(1, epochs + 1):
        ...         metrics.write({"epoch": epoch, "train_loss": loss, "lr": lr, "val_top1": top1})
    """

    def __init__(self, out_dir: Path | str | None, loggers: tuple[str, ...] = (), params: dict | None = None):
        self.out_dir = None if out_dir is None else Path(out_dir)
        self._writer = None
        self._count = 0
        self._loggers = []
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / METRICS_FILE).write_text("")
        for old in self.out_dir.glob(EVENTS_GLOB):
            old.unlink()
        flat = _flat(params or {})
        unknown = sorted(set(loggers) - set(LOGGERS))
        if unknown:
            raise UserError(f"loggers {', '.join(unknown)}: known are {', '.join(LOGGERS)}")
        self._loggers = [{"mlflow": MlflowLog, "wandb": WandbLog}[name](self.out_dir, flat) for name in loggers]

    def write(self, line: dict) -> None:
        """Append one epoch line to ``metrics.jsonl`` and write its numbers as scalars at step ``line["epoch"]``.

        Args:
            line: the epoch's numbers by key (``epoch``, ``train_loss``, ``train_<part>``, ``lr``, ``val_top1``,
                ...); values that are not numbers go to ``metrics.jsonl`` only. Without ``epoch`` the step is the
                line's count.
        """
        self._count += 1
        if self.out_dir is None:
            return
        with open(self.out_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(line) + "\n")
        # created on the first line: a run that fails before its first epoch leaves no event file
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.out_dir))
        step = int(line.get("epoch", self._count))
        scalars = {scalar_tag(key): float(value) for key, value in line.items() if key != "epoch" and _number(value)}
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()  # tensorboard shows a running run's epochs as they finish
        for logger in self._loggers:
            logger.log(scalars, step)

    def close(self) -> None:
        """Close the TensorBoard writer and the trackers (``with RunMetrics(...)`` does it on leaving)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for logger in self._loggers:
            logger.close()
        self._loggers = []

    def __enter__(self) -> "RunMetrics":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(run_dir: Path | str) -> list[dict]:
    """The epoch lines of a run folder, in order; [] when it has none yet. A torn last line (a killed run) is skipped.

    Args:
        run_dir: the run folder (holding ``metrics.jsonl``).

    Returns:
        The lines as dicts.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(line, dict):
            lines.append(line)
    return lines


def best_line(lines: list[dict], metric: str, mode: str = "max") -> dict | None:
    """The epoch line with the best ``metric``; None when no line has a finite value of it.

    Args:
        lines: epoch lines (``read_metrics``).
        metric: the key to rank by (``val_top1``, ``train_loss``).
        mode: ``"max"`` for the highest value, ``"min"`` for the lowest.

    Returns:
        The best line, or None.
    """
    if mode not in ("max", "min"):
        raise UserError(f"mode must be max or min, not {mode!r}")
    scored = [ln for ln in lines if _number(ln.get(metric)) and math.isfinite(ln[metric])]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda ln: ln[metric])


def _flat(params: dict, prefix: str = "") -> dict:
    """Nested settings as flat parameters: ``{"method_args": {"temperature": 4}}`` -> ``{"method_args.temperature": 4}``."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (
                value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)
            )
    return out


class MlflowLog:
    """One MLflow run per training run, named after its folder: the settings as parameters, the scalars per epoch."""

    def __init__(self, out_dir: Path, params: dict):
        import mlflow

        # not "Creating a new experiment" on the console of every trial
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow keeps local file stores in maintenance mode and asks for an opt-in; a store beside the run
            # folders needs no server, and `mlflow ui --backend-store-uri file:RUNS/mlruns` reads it.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((out_dir.resolve().parent / "mlruns").as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "pipeline"))
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=out_dir.name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, scalars: dict, step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbLog:
    """One Weights & Biases run per training run, offline into ``OUT/wandb`` unless the user has logged in."""

    def __init__(self, out_dir: Path, params: dict):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "pipeline"),
            name=out_dir.name,
            dir=str(out_dir),
            config=params,
            mode=mode,
            settings=wandb.Settings(silent=True),
        )

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
