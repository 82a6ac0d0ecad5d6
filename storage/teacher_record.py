"""teacher.json as one typed record: what produced a teacher's cached arrays, and how they are stored.

Written once per extraction (``Store.create_teacher``) and read by every stage
that uses the cache (``Store.teacher_info``). The JSON is the record's fields,
flat, with the token fields left out for a teacher without tokens. A
teacher.json on disk always has its ``views`` (``Store.create_teacher``
refuses a record without them); one that lacks a field is damaged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .store_record import MAX_CLASSES, MAX_SIZE, MAX_VIEWS, MAX_WIDTH, _Fields


_TOKEN_FIELDS = ("num_tokens", "token_dim", "token_prefix")
# The values a record's fields may take, declared here once (the extract flags offer the same).
OUTPUTS = ("logits", "features", "tokens")
DTYPES = ("float16", "float32")  # logits
FEATURE_DTYPES = ("float16", "float32", "int8")  # features and tokens
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True, kw_only=True)
class TeacherRecord:
    """One teacher's entry in a store (``teachers/<id>/teacher.json``)."""

    # What made the arrays: re-running an extraction must match it.
    format: str  # the store backend: "zarr" or "wds"
    precision: str  # the teacher's arithmetic, "fp32" or "bf16" (bf16 outputs differ from fp32 ones in the 3rd digit)
    name: str  # the teacher's registry name (dinov2_s, resnet152, a timm model name, a model folder as local-dir:PATH or hf-hub:REPO)
    timm_name: str
    # timm.create_model arguments given (--model-arg); left out when none
    model_args: dict = dataclasses.field(default_factory=dict)
    weights: str  # what the weights were: a file's sha256, a hub tag, or random-init:seed=N
    input_size: int  # pixels, square
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # What is stored and how (stages.cache.output_info).
    outputs: tuple[str, ...]  # of logits, features, tokens
    num_classes: int  # 0 for a teacher without a classifier
    feature_dim: int
    logits: str  # "topk" or "full"
    k: int  # top-k kept (0 without logits)
    dtype: str  # logits (and, unless feature_dtype says otherwise, features)
    feature_dtype: str  # features and tokens: float16, float32 or int8 (with per-vector scales)
    num_tokens: int | None = None  # tokens only: T, D, and how many leading tokens are not patches (1 = CLS)
    token_dim: int | None = None
    token_prefix: int | None = None
    versions: dict  # library versions of the extraction
    views: int | None = (
        None  # the teacher's own view count: set when its arrays are created (open_teacher), always on disk
    )

    def __post_init__(self):
        # JSON gives lists; the record keeps tuples, so two records compare by value and stay unchanged.
        for name in ("mean", "std", "outputs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        # as teacher.json holds them: (8, 16) == [8, 16]
        object.__setattr__(self, "model_args", json.loads(json.dumps(self.model_args)))

    @classmethod
    def from_dict(cls, data: dict) -> TeacherRecord:
        """A record from teacher.json's contents; keys it does not know are ignored.

        Raises ``ValueError`` naming the fields that are missing: every field but the token ones,
        which a teacher that stores tokens has too.
        """
        if not isinstance(data, dict):
            raise ValueError("teacher.json must hold a JSON object")
        outputs = data.get("outputs")
        optional = ("model_args",) + (() if isinstance(outputs, list) and "tokens" in outputs else _TOKEN_FIELDS)
        fields = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in fields if name not in data and name not in optional]
        if missing:
            raise ValueError(f"teacher.json lacks {', '.join(missing)}")
        _check_fields(data)
        return cls(**{k: v for k, v in data.items() if k in fields})

    def check_arrays(self, shapes: dict[str, tuple[int, ...]], num_samples: int) -> None:
        """The record's sizes against the arrays it describes (``shapes``: each array's full [V, N, ...] shape);
        ``ValueError`` naming the field that disagrees. Missing arrays are the reader's to report."""
        rows = {"features": (self.feature_dim,)} if "features" in self.outputs else {}
        if "logits" in self.outputs:
            rows.update(
                {"logits": (self.num_classes,)}
                if self.logits == "full"
                else {"topk_logp": (self.k + 1,), "topk_index": (self.k + 1,)}
            )
        if "tokens" in self.outputs:
            rows["tokens"] = (self.num_tokens, self.token_dim)
        fields = {
            "logits": "num_classes",
            "topk_logp": "k",
            "topk_index": "k",
            "features": "feature_dim",
            "tokens": "num_tokens, token_dim",
        }
        for name, shape in shapes.items():
            if name in rows and tuple(shape[2:]) != rows[name]:
                raise ValueError(
                    f"field '{fields[name]}' says rows of {list(rows[name])}, but array {name} has rows of {list(shape[2:])}"
                )
            if len(shape) >= 2 and shape[1] != num_samples:
                raise ValueError(f"array {name} has {shape[1]} rows, but the store has {num_samples} samples")
            if len(shape) >= 2 and self.views is not None and self.views > shape[0]:
                raise ValueError(f"field 'views' is {self.views}, but array {name} holds {shape[0]} views")

    def to_dict(self) -> dict:
        """teacher.json's contents: every set field, tuples as lists."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (value is None and f.default is None) or (f.name == "model_args" and not value):
                continue  # tokens fields without tokens, views before the arrays exist, no model arguments
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def replace(self, **changes) -> TeacherRecord:
        return dataclasses.replace(self, **changes)


def _check_fields(data: dict) -> None:
    """Every field of teacher.json of its type, and every number that sizes something (a rebuilt row of classes, a
    feature buffer) within sane bounds: a hand-edited field is one line naming it, not a traceback where it is used."""
    f = _Fields(data, "")
    for name in ("name", "timm_name", "weights", "format"):  # an unknown format is the backend registry's to name
        f.text(name)
    f.choice("precision", PRECISIONS)
    f.choice("dtype", DTYPES)
    f.choice("feature_dtype", FEATURE_DTYPES)
    f.subset("outputs", OUTPUTS)
    for name in ("mean", "std"):
        f.numbers(name, 3)
    f.versions("versions")
    if "model_args" in data:
        f.mapping("model_args")
    f.count("input_size", MAX_SIZE)
    f.choice("logits", ("topk", "full"))
    classes = f.count("num_classes", MAX_CLASSES, least=0)
    f.count("feature_dim", MAX_WIDTH, least=0)
    f.count("k", classes, least=0)
    if "views" in data:  # written once the arrays exist (to_dict leaves out a None)
        f.count("views", MAX_VIEWS)
    for name in _TOKEN_FIELDS:
        if data.get(name) is not None:
            f.count(name, MAX_WIDTH, least=0)
