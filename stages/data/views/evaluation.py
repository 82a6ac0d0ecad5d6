"""Evaluation views (a centred crop, no augmentation), one sample's row of a parameter table, and a rendered view's
fingerprint."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from .ops import INTERPOLATIONS


def eval_params(sizes: np.ndarray, crop: float, interpolation: str = "bilinear") -> dict[str, np.ndarray]:
    """Deterministic evaluation views: a centred square crop of ``crop`` times the shorter side, resized with
    ``interpolation`` (``crop_interp``, which only evaluation views carry)."""
    H, W = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    side = np.maximum(1, np.round(crop * np.minimum(H, W)))
    box = np.stack([(H - side) // 2 / H, (W - side) // 2 / W, side / H, side / W], axis=1)
    interp = np.full(len(sizes), INTERPOLATIONS.index(interpolation), np.uint8)
    return {"crop": box.astype(np.float32), "flip": np.zeros(len(sizes), np.uint8), "crop_interp": interp}


EVAL_FIELDS = ("crop", "flip", "crop_interp")  # the parameters of an evaluation view


def row(params: dict[str, np.ndarray], j: int) -> dict:
    """One sample's parameters out of a column table."""
    return {k: v[j] for k, v in params.items()}


def fingerprint(view: torch.Tensor) -> int:
    """A small checksum of a rendered uint8 view; stage two compares its replay against it."""
    return zlib.crc32(view.contiguous().numpy().tobytes())
