"""What a trained student is: how it was built and how its inputs look (``StudentCard``), what it was trained on
(``trained_on``), and the model card (``README.md``) a run folder carries, as timm's hub folders do."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


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
