"""The student: a timm model built from a name, randomly initialised or started from weights (``--student-weights``).

What it is once trained, and its saved files, are ``stages.training.student_card`` and
``stages.training.student_files``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from storage import UserError

from .settings import TrainSettings


log = logging.getLogger(__name__)


def run_student(s: TrainSettings, num_classes: int) -> nn.Module:
    """The student a run's settings describe (its model, arguments, starting weights and drop path), from its seed:
    what the set-up trains, and what a driver or a sweep builds first so that bad student settings fail there."""
    extra = {} if s.drop_path is None else {"drop_path_rate": s.drop_path}
    return build_student(s.student, num_classes, s.seed, s.student_weights, **s.student_kwargs, **extra)


def build_student(name: str, num_classes: int, seed: int, weights: str | None = None, **kwargs) -> nn.Module:
    """The timm student, randomly initialised from ``seed``, or started from ``weights``.

    ``weights``: ``hub`` for timm's pretrained weights of ``name``, a safetensors or torch file (an earlier run's
    ``student.safetensors``), or a timm model folder (an earlier run's OUT). A classifier for another class count
    is left out and initialised afresh, as timm does for pretrained weights; any other misfit is one line.
    """
    if not timm.is_model(name):
        raise UserError(f"unknown student '{name}': pass a timm model name (see timm.list_models())")
    torch.manual_seed(seed)
    try:
        if weights is None:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except (
        TypeError,
        ValueError,
        RuntimeError,
        AssertionError,
        IndexError,
        KeyError,
    ) as e:  # how model builders refuse arguments
        words = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"bad student settings for {name} ({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}): {words}"
        ) from e
    return _pretrained(name, num_classes, weights, kwargs)


def _pretrained(name: str, num_classes: int, weights: str, kwargs: dict) -> nn.Module:
    # A file's tensor shapes, read as timm reads it.
    from ..teachers.model_folders import hub_weights_reachable
    from ..teachers.weight_files import file_shapes, state_dict_problem

    if weights == "hub":
        if not hub_weights_reachable(name):
            raise UserError(
                f"--student-weights hub: timm's weights of {name} are not in the hub cache and the hub cannot be reached: "
                "pass a local weights file or folder"
            )
        overlay = {}
    else:
        file = _weights_file(Path(weights))
        with torch.device("meta"):  # the architecture only, to compare the file with
            shape = timm.create_model(name, pretrained=False, **kwargs)
        try:
            shapes = file_shapes(file)
        except UserError as e:
            raise UserError(f"--student-weights: {e}") from None
        classes = _classes_in(shapes, shape)
        _check_keys(shapes, file, name, shape)
        if classes != num_classes:
            held = f"a classifier for {classes} classes" if classes else "no classifier"
            log.warning(
                "--student-weights %s: the file holds %s and the data has %d: the classifier starts afresh, the rest from the file",
                file,
                held,
                num_classes,
            )
        overlay = {"pretrained_cfg_overlay": {"file": str(file), "num_classes": classes}}
    try:
        return timm.create_model(name, pretrained=True, num_classes=num_classes, **overlay, **kwargs)
    except Exception as e:
        raise UserError(f"--student-weights {weights} do not fit student {name}: {state_dict_problem(e)}") from e


def _weights_file(path: Path) -> Path:
    """The weights in ``path``: the file itself, or a timm model folder's (model.safetensors first, as timm's loader)."""
    if path.is_dir():
        found = (
            [path / "model.safetensors"]
            if (path / "model.safetensors").is_file()
            else sorted(path.glob("*.safetensors"))
        )
        if not found:
            raise UserError(f"--student-weights {path} holds no .safetensors file: pass a weights file or a run folder")
        return found[0]
    if not path.is_file():
        raise UserError(f"--student-weights {path} does not exist: pass a weights file, a run folder, or hub")
    return path


def _classes_in(shapes: dict[str, tuple[int, ...]], model: nn.Module) -> int:
    """The class count of a weights file's tensor ``shapes``: the rows of the student's classifier there (0: none)."""
    shape = shapes.get(f"{model.pretrained_cfg.get('classifier', '')}.weight")
    return shape[0] if shape else 0


def _check_keys(shapes: dict[str, tuple[int, ...]], file: Path, name: str, model: nn.Module) -> None:
    """Refuse a file (its tensor ``shapes``) whose weights are not the student's: timm loads a file with another class
    count without strict key checks, so a file of another architecture, or a classifier alone, would leave the student at random."""
    classifier = model.pretrained_cfg.get("classifier", "")
    classifiers = classifier if isinstance(classifier, (list, tuple)) else (classifier,)

    def body(
        keys,
    ) -> set[str]:  # the weights that must come from the file: all but the classifier and BN's step counters
        return {
            k
            for k in keys
            if not any(k.startswith(f"{c}.") for c in classifiers) and not k.endswith("num_batches_tracked")
        }

    held = body(shapes)
    wanted = body(model.state_dict())
    missing, unexpected = sorted(wanted - held), sorted(held - wanted)
    if missing or unexpected:
        parts = (
            [f"{len(missing)} of the student's {len(wanted)} weights are not in it (first: {', '.join(missing[:3])})"]
            if missing
            else []
        )
        parts += (
            [f"{len(unexpected)} of its weights are not the student's (first: {', '.join(unexpected[:3])})"]
            if unexpected
            else []
        )
        raise UserError(
            f"--student-weights {file} does not fit student {name} ({'; '.join(parts)}): pass weights of a {name} "
            "built with the same model arguments"
        )
