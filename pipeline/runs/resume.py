"""Continuing a stopped run: the in-process checkpoint (OUT/checkpoint.pt) and the rule for --resume.

A run without Ray Train (``pipeline train``, ``pipeline distill``, a sweep's
trial) replaces OUT/checkpoint.pt after every epoch with the whole training
state (``stages.training.distill``'s: student, method, optimiser, scheduler, scaler,
EMA, RNG, metrics) and the settings it ran with. ``--resume`` continues from
it, e.g. with more ``--epochs``; any other change is refused, for in-process
and Ray Train runs alike (``check_same_run``).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Callable

import torch

from stages.training.distill import EpochHooks
from storage import UserError
from storage.local_files import written_whole

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


DATA_FINGERPRINT = (
    "data_fingerprint"  # a train run's dataset (its file names, count and labels), recorded in its checkpoint
)


def check_same_run(saved: dict, now: dict) -> None:
    """--resume may change the epoch count; anything else would continue another run's weights."""
    now = json.loads(json.dumps(now))  # as a checkpoint holds it: lists, not tuples
    changed = sorted(k for k in {*saved, *now} if k != "epochs" and saved.get(k) != now.get(k))
    if DATA_FINGERPRINT in changed:
        raise UserError(
            "--resume on other training data than the stopped run's (images added, removed, renamed or relabelled since): "
            "drop --resume to start afresh on the data as it is now"
        )
    if changed:
        raise UserError(
            f"--resume with other settings than the stopped run ({', '.join(changed)}): "
            "pass the same settings (only --epochs may change), or drop --resume to start afresh"
        )


def load_checkpoint(out: Path, run: dict) -> dict:
    """The state saved in ``out`` by a run of the same settings ``run`` (a flat dict of plain values)."""
    path = out / CHECKPOINT
    if not path.is_file():
        raise UserError(f"no checkpoint to resume in {out} (no {CHECKPOINT}): run without --resume to start")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and lists: nothing unpickled
    except Exception as e:  # a truncated or foreign file
        raise UserError(
            f"{path} is not a checkpoint this pipeline can read ({type(e).__name__}): run without --resume to start afresh"
        ) from e
    _check_state(path, state)
    check_same_run(state.get("run", {}), run)
    if isinstance(run.get("epochs"), int) and state["epoch"] > run["epochs"]:
        raise UserError(
            f"--resume --epochs {run['epochs']}: the run in {out} has finished {state['epoch']} epochs already; "
            f"pass --epochs {state['epoch'] + 1} or more to train on, or drop --resume to start afresh"
        )
    return state


def _warn_changed_epochs(state: dict, run: dict) -> None:
    before, now = state.get("run", {}).get("epochs"), run.get("epochs")
    if before is not None and before != now:  # the schedule is a function of the total: say so, not silently
        log.warning(
            "--resume with --epochs %s instead of %s: the learning-rate schedule (warm-up, decay) is stretched over %s epochs "
            "from epoch %d on, so the run differs from one trained for %s epochs from the start",
            now,
            before,
            now,
            state["epoch"] + 1,
            now,
        )


# what a resumed run restores (stages.training.distill.checkpoint._state)
STATE_PARTS = ("model", "method", "optimizer", "scheduler", "rng", "run")


def _check_state(path: Path, state) -> None:
    """The checkpoint's shape and numbers, before they set where the run continues: a damaged or hand-edited file is one line."""

    def bad(field: str, what: str):
        return UserError(
            f"{path}: field '{field}' {what}; the checkpoint is damaged: run without --resume to start afresh"
        )

    if not isinstance(state, dict):
        raise UserError(
            f"{path} holds a {type(state).__name__}, not a checkpoint: run without --resume to start afresh"
        )
    missing = [part for part in ("epoch", "metrics", *STATE_PARTS) if part not in state]
    if missing:
        raise bad(missing[0], "is missing")
    epoch, metrics, saved = state["epoch"], state["metrics"], state["run"]
    if not isinstance(saved, dict):
        raise bad("run", f"must hold the run's settings, not a {type(saved).__name__}")
    total = saved.get("epochs")
    if (
        not isinstance(epoch, int)
        or isinstance(epoch, bool)
        or not 1 <= epoch <= (total if isinstance(total, int) else epoch)
    ):
        raise bad("epoch", f"is {epoch!r}, not an epoch of the saved run's {total} epochs")
    # a fine-tune's epoch 0
    before = (
        1
        if isinstance(metrics, list) and metrics and isinstance(metrics[0], dict) and metrics[0].get("epoch") == 0
        else 0
    )
    if (
        not isinstance(metrics, list)
        or len(metrics) != epoch + before
        or not all(isinstance(line, dict) for line in metrics)
    ):
        raise bad("metrics", f"must hold one line per finished epoch ({epoch})")
    # the Ray Train driver writes the first two; a disabled scaler reads nothing
    for part in ("student_weights", "student", "scaler"):
        if part in state and not isinstance(state[part], dict):
            raise bad(part, f"must be a mapping, not a {type(state[part]).__name__}")


def checkpoint_hooks(out: Path, run: dict, *, resume: bool, start: Callable[[], None], on_epoch=None) -> EpochHooks:
    """``train`` hooks that save every epoch's state to OUT/checkpoint.pt, and with ``resume`` start from the saved one.

    ``on_epoch(line)`` sees every epoch's line, the resumed run's earlier epochs first (a sweep reports them
    to Tune again). A fresh run removes an earlier run's checkpoint once its set-up has passed.
    """
    path = out / CHECKPOINT
    state = load_checkpoint(out, run) if resume else None
    record = json.loads(json.dumps(run))  # once, as the checkpoint holds it: lists, not tuples

    def begin() -> None:
        start()
        if state is None:
            path.unlink(missing_ok=True)
        else:  # the checkpoint fitted the built run: now say what continues, and how
            _warn_changed_epochs(state, run)
            log.info("resuming the run in %s from %s, saved after epoch %d", out, CHECKPOINT, state["epoch"])
            for line in state["metrics"] if on_epoch else ():
                on_epoch(line)

    def save(epoch_state: dict, line: dict) -> None:
        # Serialised in memory, then written as plain bytes: a full disk is then an OSError with its errno (one line
        # from the CLI), where torch.save's own writer raises a RuntimeError of many lines.
        data = io.BytesIO()
        torch.save({**epoch_state, "run": record}, data)
        with written_whole(path) as tmp:  # a kill mid-write leaves the previous epoch's checkpoint whole
            tmp.write_bytes(data.getbuffer())
        if on_epoch:
            on_epoch(line)

    return EpochHooks(state=state, save=save, start=begin)
