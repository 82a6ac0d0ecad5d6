"""The whole training state, saved once per epoch and restored by --resume, as plain tensors and values."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from storage import UserError

from ..settings import TrainSettings
from .setup import Setup


log = logging.getLogger(__name__)


@dataclass
class EpochHooks:
    """What a checkpointing caller plugs into ``train``.

    ``state``: a dict made by an earlier ``save`` call; training continues after
    its epoch. ``save(state, line)`` is called on every rank after each epoch
    (a collective such as ``ray.train.report`` must be reached by all ranks);
    ``state`` holds references to live tensors, so write or copy it at once.
    """

    state: dict | None = None
    save: Callable[[dict, dict], None] | None = None
    # Called once on rank 0 when the run has passed its set-up (student, method, optimiser built) and the
    # last run's weights are gone from out_dir: a caller writes its own run files (config.yaml) only then.
    start: Callable[[], None] | None = None


def _state(epochs_done: int, metrics: list[dict], run: Setup, s: TrainSettings) -> dict:
    """Everything needed to continue after ``epochs_done`` epochs; data order is a function of (seed, epoch)."""
    # numpy's state as plain lists: a checkpoint then loads with torch.load(weights_only=True), nothing unpickled.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    rng = {"torch": torch.get_rng_state(), "numpy": [kind, keys.tolist(), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "epoch": epochs_done,
        "metrics": list(metrics),
        "model": run.model.state_dict(),
        # The plain student to write at the end (the same tensors as "model" unless the method wraps the student).
        "student_weights": run.method.export_student(run.model).state_dict(),
        "method": run.method.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.precision.scaler.state_dict(),
        **({"ema": run.ema.state_dict()} if run.ema is not None else {}),
        "rng": rng,
        "student": run.card.to_dict(),  # what the Ray Train driver writes beside the weights
    }


def _restore(state: dict, run: Setup) -> tuple[int, list[dict]]:
    # A foreign or hand-edited checkpoint (the same settings, other weights) is one line, not load_state_dict's 40.
    parts = {
        "model": run.model,
        "method": run.method,
        "optimizer": run.optimizer,
        "scheduler": run.scheduler,
        "scaler": run.precision.scaler,
        **({"ema": run.ema} if run.ema is not None else {}),
        "rng": None,
    }
    for part, target in parts.items():
        if part == "scaler" and part not in state:
            continue  # checkpoints written before the scaler was saved
        try:
            _set_rng(state[part]) if target is None else target.load_state_dict(state[part])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            detail = next(
                (w.strip() for w in lines if "size mismatch" in w or "Missing" in w or "Unexpected" in w),
                lines[0].strip(),
            )
            raise UserError(
                f"the checkpoint's {part} state does not fit this run ({detail[:200]}): it was not written with these settings; "
                "drop --resume to start afresh"
            ) from e
    return state["epoch"], list(state["metrics"])


def _set_rng(rng: dict) -> None:
    """The random generators as ``_state`` saved them."""
    torch.set_rng_state(rng["torch"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
