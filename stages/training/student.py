"""The student: a timm model built from a name, its forward as a dict of outputs, its saved weights."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf  # timm's own writer of config.json (push_to_hf_hub uses it)
from torch import nn

from storage import UserError
from storage.location import written_whole

log = logging.getLogger(__name__)


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
    from ..teachers.teachers import (
        file_shapes,
        hub_weights_reachable,
        state_dict_problem,
    )  # a file's tensor shapes, read as timm reads it

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class StudentCard:
    """What timm needs besides the weights to use a trained student: how it was built and how its inputs look;
    and what it was trained on, for its config.json and model card."""

    name: str  # the timm model
    kwargs: dict  # its timm.create_model arguments (channels=..., img_size=...)
    num_classes: int
    size: int  # the input size it was trained at
    mean: tuple
    std: tuple
    interpolation: str = "bilinear"  # how evaluation views are resized
    crop_pct: float = 0.875  # the centre crop of evaluation views
    label_names: list | None = None  # the dataset's class names, when it has them
    provenance: dict = field(default_factory=dict)  # what it was trained on (``trained_on``); empty: not known

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # plain values: a checkpoint holds it


def trained_on(settings, data, teacher, store) -> dict:
    """A run's provenance, as plain values: the kind of run, its data (source and fingerprint), method, epochs and
    seed, the teachers and their weights ids, the store; nothing that differs between two runs of the same settings
    (no times, no run folder), so the files written from it are the same bytes for the same run.

    settings: the run's ``TrainSettings``; data: its training ``ImageDataset``; teacher: its ``TeacherSource`` or
    None; store: the ``Store`` it replays (None: `pipeline train`'s drawn views).
    """
    out = {
        "run": "train" if store is None else "distill",
        "data": {"source": data.source, "fingerprint": data.fingerprint(), "samples": len(data)},
        "method": settings.method,
        "epochs": settings.epochs,
        "seed": settings.seed,
    }
    if settings.method_args:
        out["method_args"] = settings.method_args
    if settings.label_fraction < 1:
        out["label_fraction"] = settings.label_fraction
    if settings.student_weights:
        out["started_from"] = settings.student_weights
    if teachers := _teacher_entries(teacher):
        out["teachers"] = teachers
    if store is not None:
        out["store"] = str(store.path)
    return json.loads(json.dumps(out))  # plain values, as a checkpoint and config.json hold them


def _teacher_entries(source) -> list[dict]:
    """Each teacher behind a ``TeacherSource``: its store id, name, timm model and weights id (a file's sha256, a hub tag, a seed)."""
    from ..teachers.teacher_sources import CachedEnsemble, CachedTeacher, LiveTeacher, PartsTeacher

    if isinstance(source, PartsTeacher):
        return [entry for part in source.sources.values() for entry in _teacher_entries(part)]
    if isinstance(source, CachedEnsemble):
        return [
            {**entry, "weight": round(float(w), 6)}
            for m, w in zip(source.members, source.weights)
            for entry in _teacher_entries(m)
        ]
    if isinstance(source, CachedTeacher):
        info = source.info
        return [
            {
                "id": source.teacher_id,
                "name": info.name,
                "timm_name": info.timm_name,
                "weights": info.weights,
                **({"model_args": info.model_args} if info.model_args else {}),
            }
        ]
    if isinstance(source, LiveTeacher):
        t = source.teacher
        return [
            {
                "name": t.spec.name,
                "timm_name": t.spec.timm_name,
                "weights": t.weights,
                "live": True,
                **({"model_args": t.model_args} if t.model_args else {}),
            }
        ]
    return []


# pretrained_cfg fields that describe timm's own pretrained weights of the architecture (an ImageNet tag, its licence,
# where and in which paper it was trained): a model trained here is none of that, so its config.json leaves them out.
TIMM_WEIGHTS_FIELDS = (
    "tag",
    "license",
    "description",
    "origin_url",
    "paper_name",
    "paper_ids",
    "notes",
    "hf_hub_id",
    "hf_hub_filename",
    "url",
    "file",
    "source",
    "label_descriptions",
)


def save_student(
    folder: Path,
    state: dict,
    card: StudentCard,
    weights_name: str = "student.safetensors",
    metrics: list[dict] | None = None,
    top1: str = "val_top1",
) -> None:
    """The student's weights, timm's ``config.json`` and a model card (``README.md``) beside them, each written once through a rename.

    The folder is then a timm model folder: ``timm.create_model("local-dir:FOLDER", pretrained=True)`` builds
    the trained model (architecture, class count, model arguments, input size, normalisation, interpolation,
    crop, label names) and ``timm.models.push_to_hf_hub`` publishes it as it is. The safetensors metadata
    also carries the input size and normalisation, so the weights can be a teacher as they were trained.
    Each file's bytes depend on its content alone (keys sorted, no times), so the same model saved twice, or by a
    resumed run and an uninterrupted one, gives the same files and the same sha256 as a teacher.
    metrics: the run's epoch lines, for the card's validation figures (``top1``: the key they are read from).
    """
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": card.name,
        "input_size": str(card.size),
        "mean": json.dumps(list(card.mean)),
        "std": json.dumps(list(card.std)),
    }
    with written_whole(folder / weights_name) as tmp:
        save_weights(tmp, state, meta)
    with written_whole(folder / "config.json") as tmp:
        save_config_for_hf(
            timm_model(card),
            str(tmp),
            model_config=_labels(card),
            model_args=dict(card.kwargs),
            data_config={
                "input_size": (3, card.size, card.size),
                "mean": tuple(card.mean),
                "std": tuple(card.std),
                "interpolation": card.interpolation,
                "crop_pct": card.crop_pct,
            },
        )
        tmp.write_text(canonical_json(_own_config(json.loads(tmp.read_text()), card)))
    with written_whole(folder / "README.md") as tmp:
        tmp.write_text(model_card(card, metrics, top1))


def save_weights(path: Path, state: dict, metadata: dict[str, str]) -> None:
    """``state`` as a safetensors file whose bytes depend on its content alone.

    safetensors writes the metadata from a hash map, in another order in every process; the header is written
    again with the metadata's keys sorted (the same keys and values: the same length, so in place)."""
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path), metadata=dict(sorted(metadata.items()))
    )
    os.chmod(path, 0o666 & ~_umask())  # safetensors makes its files 0600: weights on a shared disk are for the team too
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if (
            len(text) > size
        ):  # cannot happen while safetensors writes compact JSON; refuse rather than write a broken file
            raise RuntimeError(f"safetensors header of {path} grew from {size} to {len(text)} bytes when sorted")
        f.seek(8)
        f.write(text.ljust(size, b" "))  # safetensors pads its header with spaces, as here


def canonical_json(value) -> str:
    """JSON whose bytes depend on the value alone: keys sorted, two-space indent, one final newline."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _own_config(config: dict, card: StudentCard) -> dict:
    """timm's exported config of the trained model, less what describes timm's pretrained weights of the architecture,
    with what is true of this model: its provenance (data, method, teachers, store) and a description of it."""
    pretrained = {k: v for k, v in config["pretrained_cfg"].items() if k not in TIMM_WEIGHTS_FIELDS}
    if card.provenance:
        pretrained["description"] = describe(card)
        config["provenance"] = card.provenance
    return {**config, "pretrained_cfg": pretrained}


def describe(card: StudentCard) -> str:
    """One sentence on what the model is: ``resnet10t trained by `pipeline distill` (kd) on folder:/data/train``."""
    p = card.provenance
    return f"{card.name} trained by `pipeline {p['run']}` ({p['method']}) on {p['data']['source']}"


def model_card(card: StudentCard, metrics: list[dict] | None = None, top1: str = "val_top1") -> str:
    """The run folder's README.md, as timm's hub folders have one: what the model is, what it was trained on, how it validated."""
    p = card.provenance
    tags = ["image-classification", "timm"] + (["knowledge-distillation"] if p.get("teachers") else [])
    lines = ["---", "library_name: timm", "tags:", *[f"- {t}" for t in tags], "---", "", f"# {card.name}", ""]
    if p:
        lines += [
            f"{describe(card)}, with the teacher-cache distillation pipeline.",
            "",
            "## Provenance",
            "",
            "| | |",
            "|---|---|",
        ]
        data = p["data"]
        rows = [
            ("command", f"`pipeline {p['run']}`"),
            ("data", f"`{data['source']}`: {data['samples']:,} samples, fingerprint `{data['fingerprint']}`"),
            ("method", f"`{p['method']}`" + "".join(f", {k}={v}" for k, v in sorted(p.get("method_args", {}).items()))),
        ]
        rows += [("teacher", _teacher_line(t)) for t in p.get("teachers", [])]
        rows += [("store", f"`{p['store']}`")] if "store" in p else []
        rows += [("started from", f"`{p['started_from']}`")] if "started_from" in p else []
        rows += [("labels used", f"{p['label_fraction']:.0%} of the samples")] if "label_fraction" in p else []
        rows += [("epochs", str(p["epochs"])), ("seed", str(p["seed"]))]
        lines += [f"| {k} | {v} |" for k, v in rows] + [""]
    lines += [
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{card.name}`" + "".join(f", {k}={v}" for k, v in sorted(card.kwargs.items())) + " |",
        f"| classes | {card.num_classes}" + (f": {_names(card.label_names)}" if card.label_names else "") + " |",
        f"| input | {card.size} px, mean {list(card.mean)}, std {list(card.std)}, {card.interpolation}, crop {card.crop_pct} |",
        "",
    ]
    lines += ["## Validation", "", *_validation(metrics, top1), ""]
    lines += [
        "## Use",
        "",
        "```python",
        "import timm",
        "",
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)',
        "```",
        "",
        "As a teacher: `pipeline extract --teacher local-dir:PATH/TO/THIS/FOLDER ...`.",
        "",
    ]
    return "\n".join(lines)


def _teacher_line(t: dict) -> str:
    args = "".join(f", {k}={v}" for k, v in sorted(t.get("model_args", {}).items()))
    where = f"`{t['id']}` in the store: " if "id" in t else "run live: "
    weight = f", weight {t['weight']:g}" if "weight" in t else ""
    return f"{where}`{t['name']}` (timm `{t['timm_name']}`{args}), weights `{t['weights']}`{weight}"


def _names(names: list, most: int = 20) -> str:
    shown = ", ".join(str(n) for n in names[:most])
    return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "")


def _validation(metrics: list[dict] | None, top1: str) -> list[str]:
    """The card's validation lines: final and best top-1 of the run's epoch lines."""
    if metrics is None:
        return ["The run's validation figures are in its `metrics.jsonl`."]
    scored = [line for line in metrics if line.get(top1) is not None]
    if not scored:
        return ["No validation data was given to the run (`--val-data`), so it has no validation figures."]
    best = max(scored, key=lambda line: line[top1])
    final = scored[-1]
    return [
        "| | epoch | top-1 |",
        "|---|---|---|",
        f"| final | {final['epoch']} | {100 * final[top1]:.2f} % |",
        f"| best | {best['epoch']} | {100 * best[top1]:.2f} % |",
    ]


def timm_model(card: StudentCard) -> nn.Module:
    """The untrained student as timm builds it (timm reads the config it exports from the model)."""
    with torch.device("meta"):  # the architecture only: no memory, no initialisation
        return timm.create_model(card.name, pretrained=False, num_classes=card.num_classes, **card.kwargs)


def _labels(card: StudentCard) -> dict:
    return {"label_names": list(card.label_names)} if card.label_names else {}
