"""The student: a timm model built from a name, its forward as a dict of outputs, its saved weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from storage import UserError
from storage.location import written_whole


def build_student(name: str, num_classes: int, seed: int, **kwargs) -> nn.Module:
    if not timm.is_model(name):
        raise UserError(f"unknown student '{name}': pass a timm model name (see timm.list_models())")
    torch.manual_seed(seed)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError, IndexError, KeyError) as e:  # how model builders refuse arguments
        words = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"bad student settings for {name} ({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {words}") from e


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_student(path: Path, state: dict, student: str, size: int, mean, std) -> None:
    """The student's weights, written once through a rename: a crashed run leaves no weights that look finished."""
    # The metadata lets the weights be used as a teacher at the size and normalisation they were trained with.
    meta = {"model": student, "input_size": str(size), "mean": json.dumps(list(mean)), "std": json.dumps(list(std))}
    with written_whole(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors makes its files 0600: weights on a shared disk are for the team too
