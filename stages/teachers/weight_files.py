"""Reading a weights file as timm reads it: its tensor shapes (a safetensors header alone where it can), its class
count, its sha256 (a teacher's weights id), the input size and normalisation `pipeline train` records in it, and
the model loaded from it, with torch's long load_state_dict error made one short line.

Shared by teachers (``stages.teachers.teachers``) and the student's ``--student-weights``
(``stages.training.student``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import timm
import torch
from torch import nn

from storage import UserError
from storage.store_record import MAX_SIZE

from .teacher_spec import TeacherSpec


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def classes_in(shapes: dict[str, tuple[int, ...]], model_name: str) -> int:
    """The classifier width in a state dict's tensor shapes (0 when it has no classifier)."""
    classifier = getattr(timm.models.get_pretrained_cfg(model_name), "classifier", None) or "head"
    for key in (f"{classifier}.weight", f"{classifier}.fc.weight", "fc.weight", "head.weight", "head.fc.weight"):
        if key in shapes:
            return int(shapes[key][0])
    return 0


def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a weights file: a safetensors file's header alone, else the checkpoint read as timm reads it."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k.removeprefix("module."): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:
            raise UserError(
                f"cannot read weights file {path} ({type(e).__name__}: {e}); it must be safetensors or a torch checkpoint"
            ) from e
    return {k: tuple(getattr(v, "shape", ())) for k, v in read_state_dict(path).items()}


def read_state_dict(path: Path) -> dict:
    try:
        state = timm.models.load_state_dict(str(path), use_ema=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]  # torch's refusal of a pickled object runs to ten lines
        raise UserError(
            f"cannot read weights file {path} ({type(e).__name__}: {first}); it must be safetensors or a torch checkpoint"
        ) from e
    stray = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if stray is not None:
        raise UserError(
            f"weights file {path}: '{stray}' holds a {type(state[stray]).__name__}, not a tensor; a weights file maps names to tensors"
        )
    return state


def with_file_metadata(spec: TeacherSpec, path: Path, input_size: int | None) -> TeacherSpec:
    """Input size and normalisation recorded in a safetensors file (as `pipeline train` writes them).

    They describe how these weights were trained, so they win over the spec; an
    explicit ``input_size`` wins over both.
    """
    if path.suffix != ".safetensors":
        return spec
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return spec  # unreadable files get their clear error from the loader

    def read(key: str, ok, expected: str):
        try:
            value = json.loads(meta[key])
        except ValueError:
            value = meta[key]
        if not ok(value):
            raise UserError(
                f"weights file {path}: metadata '{key}' is {meta[key]!r:.40}, expected {expected}; fix or drop it"
            )
        return value

    def rgb(v) -> bool:
        return (
            isinstance(v, list)
            and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        )

    size = (
        read(
            "input_size",
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE,
            f"a whole number of pixels in [1, {MAX_SIZE}]",
        )
        if "input_size" in meta
        else None
    )
    return replace(
        spec,
        input_size=input_size or size or spec.input_size,
        mean=tuple(read("mean", rgb, "a list of 3 numbers")) if "mean" in meta else spec.mean,
        std=tuple(read("std", rgb, "a list of 3 numbers")) if "std" in meta else spec.std,
    )


def load_file(spec: TeacherSpec, path: Path, kwargs: dict) -> nn.Module:
    """A timm model with weights from a local file; its class count comes from the file."""
    state_dict = read_state_dict(path)
    nc = (
        spec.num_classes
        if spec.num_classes is not None
        else classes_in({k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}, spec.timm_name)
    )
    del state_dict
    try:
        # Through timm's loader so each model's checkpoint filter runs (position
        # embeddings resampled to img_size, original checkpoint formats converted).
        return timm.create_model(
            spec.timm_name,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path), "num_classes": nc},
            num_classes=nc,
            **kwargs,
        )
    except Exception as e:
        raise UserError(
            f"weights {path} do not fit teacher '{spec.name}' (timm model {spec.timm_name}): {state_dict_problem(e)}"
        ) from e


def state_dict_problem(e: Exception) -> str:
    """torch's load_state_dict error in one short line: how many keys are missing, unexpected or of another shape, with an example of each."""
    text = str(e).strip()
    if not text.startswith("Error(s) in loading state_dict"):
        return text.splitlines()[0] if text else type(e).__name__

    def keys(label: str) -> list[str]:
        found = re.search(rf"{label} key\(s\) in state_dict: (.*?)\.\s*(?:\n|$)", text, re.S)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []

    shapes = re.findall(
        r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
        r"the shape in current model is torch\.Size\((\[[^\]]*\])\)",
        text,
    )
    parts = []
    for label, found in (("missing", keys("Missing")), ("unexpected", keys("Unexpected"))):
        if found:
            parts.append(f"{len(found)} {label} key(s) (e.g. {found[0]})")
    if shapes:
        key, file_shape, model_shape = shapes[0]
        parts.append(
            f"{len(shapes)} of another shape (e.g. {key}: {file_shape} in the file, {model_shape} in the model)"
        )
    return "; ".join(parts) or text.splitlines()[0]
