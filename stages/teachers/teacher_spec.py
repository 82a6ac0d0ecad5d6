"""``TeacherSpec``: what a teacher is (its timm model, input size, normalisation, outputs), as the teacher
registry holds it and a weights file's metadata completes it (``teachers``, ``weight_files``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TeacherSpec:
    """What a teacher is. ``None`` fields fall back to timm's pretrained config for the model."""

    name: str
    timm_name: str
    input_size: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    outputs: tuple[str, ...] = ("logits", "features")
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    interpolation: str | None = None  # how the teacher's own evaluation resized images (a model folder's config.json)
    num_classes: int | None = None  # classifier width from a model folder's config.json; None: from the weights
