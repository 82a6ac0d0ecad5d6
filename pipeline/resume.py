"""Continuing a stopped run: the in-process checkpoint (OUT/checkpoint.pt) and the rule for --resume.

A run without Ray Train (``pipeline train``, ``pipeline distill``, a sweep's
trial) replaces OUT/checkpoint.pt after every epoch with the whole training
state (``stages.distill``'s: student, method, optimiser, scheduler, scaler,
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
from storage.location import written_whole

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


def check_same_run(saved: dict, now: dict) -> None:
    """--resume may change the epoch count; anything else would continue another run's weights."""
    now = json.loads(json.dumps(now))  # as a checkpoint holds it: lists, not tuples
    changed = sorted(k for k in {*saved, *now} if k != "epochs" and saved.get(k) != now.get(k))
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
        raise UserError(f"{path} is not a checkpoint this pipeline can read ({type(e).__name__}): run without --resume to start afresh") from e
    check_same_run(state.get("run", {}), run)
    before, now = state.get("run", {}).get("epochs"), run.get("epochs")
    if before is not None and before != now:  # the schedule is a function of the total: say so, not silently
        log.warning("--resume with --epochs %s instead of %s: the learning-rate schedule (warm-up, decay) is stretched over %s epochs "
                    "from epoch %d on, so the run differs from one trained for %s epochs from the start", now, before, now, state["epoch"] + 1, now)
    return state


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
        else:
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
