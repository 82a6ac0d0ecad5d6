"""How teacher outputs become store rows, and how rows become teacher outputs again.

Writing (``encode``): logits are kept either whole (``logits``) or as top-k
log-probabilities and class indices with the exact tail mass, the float32
log-sum-exp of the full row and the target class's log-probability
(``stages.cache.topk``). Features and tokens are kept in ``feature_dtype``:
float16, float32, or int8 with a symmetric per-vector scale (``features_scale``
[V, N], ``tokens_scale`` [V, N, T]). Reading (``decode``) always hands a method
the same keys it would get from a live teacher: ``logits`` (B, C), ``features``
(B, D) and ``tokens`` (B, T, D), all float32, with top-k rows expanded by
``topk.TopK.logits`` (at the method's temperature) and int8 rows dequantised.
"""

from __future__ import annotations

import numpy as np
import torch

from storage import ArraySpec, TeacherRecord, UserError
from storage.teacher_record import DTYPES, FEATURE_DTYPES

from . import topk

# int8 scales stay float32: 4 bytes per vector (1% at D = 384) buys freedom from
# float16's subnormal range, where near-zero vectors (ReLU feature-map positions)
# would lose their scale's precision, and from its 65504 ceiling.
SCALE_DTYPE = "float32"
VECTORS = ("features", "tokens")  # the outputs kept in feature_dtype


def output_info(
    teacher,
    *,
    logits: str = "topk",
    k: int = 10,
    dtype: str = "float16",
    feature_dtype: str | None = None,
    outputs=None,
) -> dict:
    """The part of teacher.json that fixes what is stored and how: ``TeacherRecord`` fields, as a dict.

    outputs: default the teacher's ``default_outputs`` (tokens only when asked for).
    feature_dtype: how features and tokens are stored; ``None`` is ``dtype``.
    """
    outputs = tuple(outputs or teacher.default_outputs)
    missing = [o for o in outputs if o not in teacher.outputs]
    if missing:
        raise UserError(
            f"teacher '{teacher.spec.name}' has no {', '.join(missing)} output (it gives: {', '.join(teacher.outputs)})"
        )
    if logits not in ("topk", "full"):
        raise UserError(f"--logits must be topk or full, not '{logits}'")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    feature_dtype = feature_dtype or dtype
    if feature_dtype not in FEATURE_DTYPES:
        raise UserError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}, not '{feature_dtype}'")
    if k < 1:
        raise UserError(f"--topk must be at least 1, not {k}")
    info = {
        "outputs": list(outputs),
        "num_classes": teacher.num_classes,
        "feature_dim": teacher.feature_dim,
        "logits": logits,
        "k": min(k, teacher.num_classes) if teacher.num_classes else 0,
        "dtype": dtype,
        "feature_dtype": feature_dtype,
    }
    if "tokens" in outputs:
        T, D = teacher.token_shape
        # token_prefix: leading tokens that are not patches (1 = CLS for ViTs; registers are dropped).
        info.update(num_tokens=T, token_dim=D, token_prefix=teacher.token_prefix)
    return info


def array_specs(info: TeacherRecord) -> dict[str, ArraySpec]:
    """Store arrays for a teacher described by ``info`` (see ``output_info``)."""
    specs = {}
    if "logits" in info.outputs:
        C, k, dtype = info.num_classes, info.k, info.dtype
        if info.logits == "full":
            specs["logits"] = ArraySpec((C,), dtype)
        else:
            # The top k, then the target class (stages.cache.topk); the tail's log-mass and mean log-probability.
            specs["topk_logp"] = ArraySpec((k + 1,), dtype)
            specs["topk_index"] = ArraySpec((k + 1,), index_dtype(C))
            specs["tail"] = ArraySpec((2,), dtype)
            specs["logsumexp"] = ArraySpec((), "float32")
    rows = {"features": (info.feature_dim,), "tokens": (info.num_tokens, info.token_dim)}
    fdtype = info.feature_dtype
    for key in VECTORS:
        if key in info.outputs:
            specs[key] = ArraySpec(rows[key], fdtype)
            if fdtype == "int8":
                specs[f"{key}_scale"] = ArraySpec(rows[key][:-1], SCALE_DTYPE)  # one per vector
    return specs


def index_dtype(num_classes: int) -> str:
    """The dtype of stored class indices."""
    return "int16" if num_classes <= np.iinfo(np.int16).max else "int32"


def stored_names(info: TeacherRecord, needs) -> list[str]:
    """The arrays to read so that ``decode`` can give the outputs in ``needs``."""
    names = []
    for key in needs:
        if key not in info.outputs:
            raise UserError(
                f"the cached teacher has no {key} (it stores {', '.join(info.outputs)}): extract the teacher again under a new "
                f"--teacher-id with --outputs {','.join([*info.outputs, key])}"
            )
        if key == "logits":
            names += ["logits"] if info.logits == "full" else list(topk.ARRAYS)
        else:
            names.append(key)
            if key in VECTORS and info.feature_dtype == "int8":
                names.append(f"{key}_scale")
    return names


def encode(out: dict[str, torch.Tensor], labels: torch.Tensor, info: TeacherRecord) -> dict[str, np.ndarray]:
    """Store rows for one batch of teacher outputs; ``labels`` (B,): each view's target class (top-k stores keep its log-probability)."""
    dtype = getattr(torch, info.dtype)
    rows = {}
    if "logits" in info.outputs:
        logits = out["logits"].float()  # (B, C)
        if info.logits == "full":
            rows["logits"] = logits.to(dtype).numpy()
        else:
            rows.update(topk.TopK.of(logits, info.k, labels).rows(info.dtype, index_dtype(info.num_classes)))
    fdtype = info.feature_dtype
    for key in VECTORS:
        if key in info.outputs:
            x = out[key].float()  # (B, D) or (B, T, D)
            if fdtype == "int8":
                q, scale = quantize(x)
                rows[key], rows[f"{key}_scale"] = q.numpy(), scale.numpy()
            else:
                rows[key] = x.to(getattr(torch, fdtype)).numpy()
    return rows


def decode(
    rows: dict[str, np.ndarray], info: TeacherRecord, needs, temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """Teacher outputs (float32) from store rows, keyed like a live teacher's.

    ``temperature``: the one the method softens teacher logits at; a top-k row's
    tail is rebuilt for it (``topk.TopK.rest_logp``). Full logits ignore it.
    """
    out = {}
    for key in needs:
        if key == "logits" and info.logits == "topk":
            out["logits"] = topk.logits_from_topk(rows, info.num_classes, temperature)
        elif key in VECTORS and info.feature_dtype == "int8":
            out[key] = dequantize(
                torch.from_numpy(np.asarray(rows[key])), torch.from_numpy(np.asarray(rows[f"{key}_scale"]))
            )
        else:
            out[key] = torch.from_numpy(np.asarray(rows[key])).float()
    return out


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantisation of each vector along the last axis: (int8 like x, float32 scale x.shape[:-1]).

    scale = max|x| / 127 and q = round(x / scale), so |x - q * scale| <= scale / 2
    and every nonzero vector uses the full [-127, 127] range.
    """
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127  # (...,)
    # An all-zero vector has scale 0 and stays zero (dividing by the tiniest float keeps it 0/eps = 0).
    q = (x / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)).round().clamp_(-127, 127)
    return q.to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 vectors from int8 ``q`` and per-vector ``scale`` (see ``quantize``)."""
    return q.float() * scale.float().unsqueeze(-1)


def storage_bytes(info: TeacherRecord, num_samples: int, num_views: int) -> dict[str, int]:
    """Raw (uncompressed) bytes each output will take in the store, scales and top-k parts included."""
    total: dict[str, int] = {}
    for name, spec in array_specs(info).items():
        base = name.removesuffix("_scale")
        output = base if base in VECTORS else "logits"  # topk_*, tail, logsumexp are the logits
        total[output] = (
            total.get(output, 0)
            + num_samples * num_views * int(np.prod(spec.row_shape)) * np.dtype(spec.dtype).itemsize
        )
    return total


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def storage_line(teacher_id: str, info: TeacherRecord, num_samples: int, num_views: int) -> str:
    """One line saying how much a teacher's arrays will take, before extraction starts."""
    parts = sorted(storage_bytes(info, num_samples, num_views).items(), key=lambda kv: -kv[1])
    total = sum(b for _, b in parts)
    # Raw bytes: blosc-zstd saves little on float features (about 1.08x, FACTS.md), so this is a fair upper bound.
    return (
        f"store will hold about {_size(total)} (uncompressed) for teacher {teacher_id} "
        f"({', '.join(f'{k} {_size(b)}' for k, b in parts)}; {num_samples:,} samples × {num_views:,} views)"
    )
