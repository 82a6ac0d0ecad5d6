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


def build_student(name: str, num_classes: int, seed: int, **kwargs) -> nn.Module:
    if not timm.is_model(name):
        raise UserError(f"unknown student '{name}': pass a timm model name (see timm.list_models())")
    torch.manual_seed(seed)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UserError(f"bad student settings for {name}: {e}") from e


def student_forward(model: nn.Module, x: torch.Tensor, needs) -> dict[str, torch.Tensor]:
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    out = {"logits": model.get_classifier()(features)}
    if "features" in needs:
        out["features"] = features
    return out


def save_student(path: Path, state: dict, student: str, size: int, mean, std) -> None:
    """The student's weights, written once through a rename: a crashed run leaves no weights that look finished."""
    tmp = path.with_name(f".{path.name}.tmp")
    # The metadata lets the weights be used as a teacher at the size and normalisation they were trained with.
    meta = {"model": student, "input_size": str(size), "mean": json.dumps(list(mean)), "std": json.dumps(list(std))}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
