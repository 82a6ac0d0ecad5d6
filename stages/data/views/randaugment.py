"""timm's RandAugment as a recorded op: its string parsed, its draws recorded, its ops applied through Pillow."""

from __future__ import annotations

import math

import numpy as np

from storage import ArraySpec, UserError

from ...settings import Text

from .draws import _gauss
from .ops import INTERPOLATIONS, ViewOp, from_pil, to_pil

_LEVEL_DENOM = 10.0  # timm's magnitude scale

# timm's level functions for the ops it randomly negates, with the sign taken from the record
# instead of Python's global ``random`` (same arithmetic, same order; tests compare with timm).
_SIGNED_LEVELS = {
    "Rotate": lambda m, hp: (m / _LEVEL_DENOM) * 30.0,
    "ShearX": lambda m, hp: (m / _LEVEL_DENOM) * 0.3,
    "ShearY": lambda m, hp: (m / _LEVEL_DENOM) * 0.3,
    "TranslateX": lambda m, hp: (m / _LEVEL_DENOM) * float(hp["translate_const"]),
    "TranslateY": lambda m, hp: (m / _LEVEL_DENOM) * float(hp["translate_const"]),
    "TranslateXRel": lambda m, hp: (m / _LEVEL_DENOM) * hp.get("translate_pct", 0.45),
    "TranslateYRel": lambda m, hp: (m / _LEVEL_DENOM) * hp.get("translate_pct", 0.45),
}
_SIGNED_ENHANCE = {"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"}
NEGATED_OPS = frozenset(_SIGNED_LEVELS) | _SIGNED_ENHANCE


class RandAugmentText(Text):
    """timm's RandAugment string, read now: a recipe's typo is refused where the recipe is read, naming it."""

    what = "timm's RandAugment string, e.g. rand-m9-mstd0.5-inc1"

    def check(self, value):
        parse_randaugment(super().check(value))
        return value


def parse_randaugment(config: str) -> dict:
    """timm's ``rand-mM-nN-mstdS-incI-pP-mmaxX`` string as settings (timm's defaults: m10 n2 mstd0 inc0 p0.5)."""
    import re

    parts = str(config).split("-")
    if parts[0] != "rand":
        raise UserError(f"randaugment '{config}' must start with 'rand' (timm's form, e.g. rand-m9-mstd0.5-inc1)")
    out = dict(magnitude=_LEVEL_DENOM, num_layers=2, mstd=0.0, increasing=False, prob=0.5, mmax=None)
    for part in parts[1:]:
        m = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", part)
        if not m:
            raise UserError(
                f"randaugment '{config}': cannot read section '{part}'; known sections are "
                "mN (magnitude), nN (ops per image), mstdS, incI, pP, mmaxN (transform sets -t... are not supported)"
            )
        key, val = m[1], m[2]
        if key == "mstd":
            out["mstd"] = math.inf if float(val) > 100 else float(val)  # timm: > 100 means uniform in [0, m]
        elif key == "mmax":
            out["mmax"] = int(float(val))
        elif key == "inc":
            out["increasing"] = bool(int(float(val)))
        elif key == "m":
            out["magnitude"] = float(int(float(val)))
        elif key == "n":
            out["num_layers"] = int(float(val))
        else:
            out["prob"] = float(val)
    if not 1 <= out["num_layers"] <= 127 or not 0 <= out["prob"] <= 1:
        raise UserError(f"randaugment '{config}': n must be in 1..127 and p in [0, 1]")
    return out


class RandAugment(ViewOp):
    """timm's ``rand-...`` RandAugment with every random choice recorded.

    Per layer: the op index into timm's list (``_RAND_TRANSFORMS``, or
    ``_RAND_INCREASING_TRANSFORMS`` with ``inc1``), whether it is applied
    (timm's per-op probability), its magnitude (gauss(m, mstd) clipped to
    [0, mmax or 10], as timm samples it), stored negated when timm's random
    negation flips the op's level (``NEGATED_OPS`` only), and with timm's
    ``random`` interpolation the resampling filter (0 bilinear, 1 bicubic).
    The pixel work is timm's own op functions on a PIL image of the resized
    view, with ``fill`` where geometric ops uncover pixels.
    """

    stream = 2

    def __init__(self, config: str, fill=(124, 116, 104), interpolation: str = "random"):
        from timm.data import auto_augment as aa

        s = parse_randaugment(config)
        self.num_layers, self.magnitude, self.mstd, self.prob = s["num_layers"], s["magnitude"], s["mstd"], s["prob"]
        self.upper = float(s["mmax"] or _LEVEL_DENOM)
        self.names = list(aa._RAND_INCREASING_TRANSFORMS if s["increasing"] else aa._RAND_TRANSFORMS)
        self.fill, self.interpolation = tuple(int(v) for v in fill), interpolation
        self.hparams = dict(aa._HPARAMS_DEFAULT, img_mean=self.fill)
        self.negated = np.array([name in NEGATED_OPS for name in self.names])
        n = self.num_layers
        self.fields = {
            "ra_op": ArraySpec((n,), "int8"),
            "ra_apply": ArraySpec((n,), "uint8"),
            "ra_mag": ArraySpec((n,), "float32"),
        }
        if interpolation == "random":
            self.fields["ra_interp"] = ArraySpec((n,), "uint8")
        self.draws = 6 * n

    def draw(self, u, sizes, ids=None):
        u = u.reshape(len(u), self.num_layers, 6)  # per layer: op, apply, gauss (2), sign, interpolation
        op = np.minimum((u[..., 0] * len(self.names)).astype(np.int64), len(self.names) - 1)
        apply = u[..., 1] <= self.prob  # timm skips an op when random() > prob
        if self.mstd == math.inf:
            mag = u[..., 2] * self.magnitude  # timm: random.uniform(0, m)
        elif self.mstd > 0:
            mag = self.magnitude + self.mstd * _gauss(u[..., 2], u[..., 3])
        else:
            mag = np.full(op.shape, self.magnitude)
        mag = np.clip(mag, 0.0, self.upper).astype(np.float32)
        negate = (u[..., 4] > 0.5) & self.negated[op]  # timm: -v if random() > 0.5
        out = {
            "ra_op": op.astype(np.int8),
            "ra_apply": apply.astype(np.uint8),
            "ra_mag": np.where(negate, -mag, mag).astype(np.float32),
        }
        if "ra_interp" in self.fields:
            out["ra_interp"] = (u[..., 5] >= 0.5).astype(np.uint8)  # timm: random.choice((BILINEAR, BICUBIC))
        return out

    def level_args(self, name: str, mag: float) -> tuple:
        """timm's level-to-argument for op ``name`` at a recorded (signed) magnitude."""
        from timm.data import auto_augment as aa

        sign, m = math.copysign(1.0, mag), abs(mag)
        if name in _SIGNED_LEVELS:
            return (_SIGNED_LEVELS[name](m, self.hparams) * sign,)
        if name in _SIGNED_ENHANCE:
            return (max(0.1, 1.0 + ((m / _LEVEL_DENOM) * 0.9) * sign),)
        level_fn = aa.LEVEL_TO_ARG[name]
        return level_fn(m, self.hparams) if level_fn is not None else ()

    def resample(self, params: dict, k: int):
        from PIL import Image

        name = INTERPOLATIONS[int(params["ra_interp"][k])] if "ra_interp" in params else self.interpolation
        return {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[name]

    def apply(self, image, params, size):
        from timm.data import auto_augment as aa

        if "ra_op" not in params or not np.any(params["ra_apply"]):
            return image
        img = to_pil(image)
        for k in range(self.num_layers):
            if not params["ra_apply"][k]:
                continue
            name = self.names[int(params["ra_op"][k])]
            args = self.level_args(name, float(params["ra_mag"][k]))
            if aa.NAME_TO_OP[name] is aa.posterize and args[0] <= 0:
                # Keeping 0 bits: Pillow >= 11 raises where older Pillow (which timm was written
                # for) gave a black image; keep the black image rather than fail mid-epoch.
                img = img.point(lambda _: 0)
                continue
            img = aa.NAME_TO_OP[name](img, *args, fillcolor=self.fill, resample=self.resample(params, k))
        return from_pil(img)
