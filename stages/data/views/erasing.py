"""Random erasing as a recorded op (timm's ``RandomErasing``, per-pixel normal fill)."""

from __future__ import annotations

import math

import numpy as np
import torch

from storage import ArraySpec

from .ops import ViewOp, pixel_box


class RandomErasing(ViewOp):
    """timm's RandomErasing (one box, 'const' mode) on the final view, box recorded normalised.

    With probability ``p``, up to 10 attempts draw an area fraction in
    ``area`` and a log-uniform aspect in ``aspect``; the first box that fits
    is kept, as timm does. ``erase_box`` is (top, left, height, width) of the
    square view, zeros for no box. The fill is the constant ``fill`` colour
    (uint8, fixed by the recipe; by default the ImageNet mean, which is what
    timm's 'const' mode writes: zero after normalisation).
    """

    fields = {"erase_box": ArraySpec((4,), "float32")}
    attempts = 10
    draws = 1 + 4 * attempts
    stream = 4

    def __init__(self, p: float, area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3), fill=(124, 116, 104)):
        self.p, self.area, self.aspect = p, tuple(area), tuple(aspect)
        self.fill = torch.tensor([int(v) for v in fill], dtype=torch.uint8).view(3, 1, 1)

    def draw(self, u, sizes, ids=None):
        n = len(u)
        a = u[:, 1:].reshape(n, self.attempts, 4)
        area = self.area[0] + (self.area[1] - self.area[0]) * a[..., 0]
        lo, hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        aspect = np.exp(lo + (hi - lo) * a[..., 1])
        h, w = np.sqrt(area * aspect), np.sqrt(area / aspect)  # fractions of the square view's side
        ok = (h < 1) & (w < 1)
        first, pick = np.argmax(ok, axis=1), np.arange(n)
        h, w = h[pick, first], w[pick, first]
        top, left = a[pick, first, 2] * (1 - h), a[pick, first, 3] * (1 - w)
        erase = (u[:, 0] <= self.p) & ok.any(axis=1)  # timm erases unless random() > p
        box = np.where(erase[:, None], np.stack([top, left, h, w], axis=1), 0.0)
        return {"erase_box": box.astype(np.float32)}

    def apply(self, image, params, size):
        if "erase_box" not in params:
            return image
        y0, y1, x0, x1 = pixel_box(params["erase_box"], image.shape[-1])
        if y1 <= y0 or x1 <= x0:
            return image
        image = image.clone()  # never write into the dataset's own tensor
        image[:, y0:y1, x0:x1] = self.fill
        return image
