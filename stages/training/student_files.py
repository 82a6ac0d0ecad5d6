"""A trained student's files: its weights, timm's ``config.json`` and the model card, written so that the folder is a
timm model folder and the same model always gives the same bytes (keys sorted, no times)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf  # timm's own writer of config.json (push_to_hf_hub uses it)
from torch import nn

from storage.local_files import written_whole

from .student_card import StudentCard, describe, model_card


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
        # cannot happen while safetensors writes compact JSON; refuse rather than write a broken file
        if len(text) > size:
            raise RuntimeError(f"safetensors header of {path} grew from {size} to {len(text)} bytes when sorted")
        f.seek(8)
        f.write(text.ljust(size, b" "))  # safetensors pads its header with spaces, as here


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def timm_model(card: StudentCard) -> nn.Module:
    """The untrained student as timm builds it (timm reads the config it exports from the model)."""
    with torch.device("meta"):  # the architecture only: no memory, no initialisation
        return timm.create_model(card.name, pretrained=False, num_classes=card.num_classes, **card.kwargs)


def _labels(card: StudentCard) -> dict:
    return {"label_names": list(card.label_names)} if card.label_names else {}
