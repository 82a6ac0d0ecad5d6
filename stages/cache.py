"""How teacher outputs become store rows, and how rows become teacher outputs again.

Writing (``encode``): logits are kept either whole (``logits``) or as top-k
values and class indices plus the exact float32 log-sum-exp of the full row and
the true class's logit. Reading (``decode``) always hands a method the same
keys it would get from a live teacher: ``logits`` (B, C) and ``features`` (B, D),
both float32, with top-k rows expanded by ``logits_from_topk``.
"""

from __future__ import annotations

import numpy as np
import torch

from storage import ArraySpec, UserError

DTYPES = ("float16", "float32")


def output_info(teacher, *, logits: str = "topk", k: int = 10, dtype: str = "float16", outputs=None) -> dict:
    """The part of teacher.json that fixes what is stored and how."""
    outputs = tuple(outputs or teacher.outputs)
    missing = [o for o in outputs if o not in teacher.outputs]
    if missing:
        raise UserError(f"teacher '{teacher.spec.name}' has no {', '.join(missing)} output (it gives: {', '.join(teacher.outputs)})")
    if logits not in ("topk", "full"):
        raise UserError(f"--logits must be topk or full, not '{logits}'")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")
    if k < 1:
        raise UserError(f"--topk must be at least 1, not {k}")
    return {
        "outputs": list(outputs),
        "num_classes": teacher.num_classes,
        "feature_dim": teacher.feature_dim,
        "logits": logits,
        "k": min(k, teacher.num_classes) if teacher.num_classes else 0,
        "dtype": dtype,
    }


def array_specs(info: dict) -> dict[str, ArraySpec]:
    """Store arrays for a teacher described by ``info`` (see ``output_info``)."""
    specs = {}
    if "logits" in info["outputs"]:
        C, k, dtype = info["num_classes"], info["k"], info["dtype"]
        if info["logits"] == "full":
            specs["logits"] = ArraySpec((C,), dtype)
        else:
            specs["topk_values"] = ArraySpec((k,), dtype)
            specs["topk_index"] = ArraySpec((k,), "int16" if C <= np.iinfo(np.int16).max else "int32")
            specs["logsumexp"] = ArraySpec((), "float32")
            specs["target_logit"] = ArraySpec((), dtype)
    if "features" in info["outputs"]:
        specs["features"] = ArraySpec((info["feature_dim"],), info["dtype"])
    return specs


def stored_names(info: dict, needs) -> list[str]:
    """The arrays to read so that ``decode`` can give the outputs in ``needs``."""
    names = []
    for key in needs:
        if key not in info["outputs"]:
            raise UserError(f"the cache has no teacher '{key}' (it stores {', '.join(info['outputs'])}): extract with --outputs {key}")
        if key == "logits":
            names += ["logits"] if info["logits"] == "full" else ["topk_values", "topk_index", "logsumexp"]
        else:
            names.append(key)
    return names


def encode(out: dict[str, torch.Tensor], labels: torch.Tensor, info: dict) -> dict[str, np.ndarray]:
    """Store rows for one batch of teacher outputs."""
    dtype = getattr(torch, info["dtype"])
    rows = {}
    if "logits" in info["outputs"]:
        logits = out["logits"].float()  # (B, C)
        if info["logits"] == "full":
            rows["logits"] = logits.to(dtype).numpy()
        else:
            values, index = logits.topk(info["k"], dim=1)  # (B, k)
            rows["topk_values"] = values.to(dtype).numpy()
            rows["topk_index"] = index.numpy()
            rows["logsumexp"] = torch.logsumexp(logits, dim=1).numpy()
            rows["target_logit"] = logits.gather(1, labels.long().view(-1, 1)).squeeze(1).to(dtype).numpy()
    if "features" in info["outputs"]:
        rows["features"] = out["features"].float().to(dtype).numpy()
    return rows


def decode(rows: dict[str, np.ndarray], info: dict, needs) -> dict[str, torch.Tensor]:
    """Teacher outputs (float32) from store rows, keyed like a live teacher's."""
    out = {}
    for key in needs:
        if key == "logits" and info["logits"] == "topk":
            out["logits"] = logits_from_topk(
                torch.from_numpy(np.asarray(rows["topk_values"])),
                torch.from_numpy(np.asarray(rows["topk_index"])),
                torch.from_numpy(np.asarray(rows["logsumexp"])),
                info["num_classes"],
            )
        else:
            out[key] = torch.from_numpy(np.asarray(rows[key])).float()
    return out


def logits_from_topk(values: torch.Tensor, index: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full logits (B, C) whose softmax gives the stored top-k probabilities exactly.

    The probability mass outside the top k, ``1 - sum(exp(values - lse))``, is
    spread evenly over the other classes. The row's log-sum-exp equals the
    stored one, so the reconstruction is a proper logit vector at any temperature.
    """
    values = values.float()  # (B, k)
    lse = lse.float().view(-1, 1)  # (B, 1)
    k = values.shape[1]
    full = torch.empty(values.shape[0], num_classes, dtype=torch.float32)
    if num_classes > k:
        rest = (1.0 - torch.exp(values - lse).sum(1, keepdim=True)).clamp_min(1e-12)
        full[:] = lse + torch.log(rest / (num_classes - k))
    return full.scatter_(1, index.long(), values)
