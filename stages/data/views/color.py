"""Colour jitter as a recorded op (timm's ``color_jitter``: brightness, contrast, saturation, hue in a random order)."""

from __future__ import annotations


import numpy as np

from storage import ArraySpec, UserError

from .ops import ViewOp, from_pil, to_pil


class ColorJitter(ViewOp):
    """torchvision's ColorJitter (as timm uses it, on PIL images) with factors and order recorded.

    ``cj_factors`` are (brightness, contrast, saturation, hue) and ``cj_order``
    the order the four adjustments run in (torchvision's ``randperm(4)``).
    Components the recipe leaves off keep their identity factor and are skipped.
    """

    fields = {"cj_factors": ArraySpec((4,), "float32"), "cj_order": ArraySpec((4,), "uint8")}
    draws = 8
    stream = 3

    def __init__(self, jitter):
        b, c, s, h = normalise_jitter(jitter)
        self.ranges = [
            (max(0.0, 1 - b), 1 + b) if b else None,
            (max(0.0, 1 - c), 1 + c) if c else None,
            (max(0.0, 1 - s), 1 + s) if s else None,
            (-h, h) if h else None,
        ]

    def draw(self, u, sizes, ids=None):
        factors = np.tile(np.array([1.0, 1.0, 1.0, 0.0]), (len(u), 1))
        for k, r in enumerate(self.ranges):
            if r is not None:
                factors[:, k] = r[0] + (r[1] - r[0]) * u[:, k]
        order = np.argsort(u[:, 4:8], axis=1, kind="stable")  # a uniform random permutation of the four
        return {"cj_factors": factors.astype(np.float32), "cj_order": order.astype(np.uint8)}

    def apply(self, image, params, size):
        from torchvision.transforms import functional as F

        if "cj_factors" not in params or all(r is None for r in self.ranges):
            return image
        fns = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        img = to_pil(image)
        for k in params["cj_order"]:
            if self.ranges[int(k)] is not None:
                img = fns[int(k)](img, float(params["cj_factors"][int(k)]))
        return from_pil(img)


def normalise_jitter(jitter) -> tuple[float, float, float, float]:
    """timm's colour-jitter setting: one float for brightness/contrast/saturation, or 3 or 4 values."""
    values = (float(jitter),) * 3 if isinstance(jitter, (int, float)) else tuple(float(v) for v in jitter)
    if len(values) not in (3, 4) or min(values) < 0 or (len(values) == 4 and values[3] > 0.5):
        raise UserError(
            f"color_jitter {jitter!r}: give one value, or (brightness, contrast, saturation[, hue]) "
            "with every value >= 0 and hue <= 0.5"
        )
    return (*values, 0.0) if len(values) == 3 else values
