"""Recorded augmented views: parameters drawn once, stored, and replayed exactly.

A view's parameters are a pure function of (plan seed, view index, sample id)
(a mixing partner also of the block the sample is drawn with), drawn from a
counter-based hash rather than a stateful generator, so any subset of views
can be drawn in any order by any worker. Each augmentation is
a ``ViewOp``: it names the fields it records, draws them for a batch of
samples (vectorised), and applies one sample's fields to a uint8 image. The
store records whatever fields the ops declare.

The ops, in the order they touch the image (timm's training order):

==================  =========  ======================================================
op                  stream     recorded fields
==================  =========  ======================================================
RandomResizedCrop   0          crop (4,) float32
HorizontalFlip      1          flip uint8
RandAugment         2          ra_op (n,) int8, ra_apply (n,) uint8, ra_mag (n,) float32
                               (sign folded in), ra_interp (n,) uint8 if random
ColorJitter         3          cj_factors (4,) float32, cj_order (4,) uint8
RandomErasing       4          erase_box (4,) float32
MixupCutmix         5          mix_partner int64, mix_lam float64, mix_box (4,) float32
                    6          (the matching of a group of views, ``mix_pair_views`` > 1)
==================  =========  ======================================================

Streams are fixed per op, so turning one augmentation on never changes what
another draws, and the default recipe (crop + flip) draws what it always did.
Every model renders the same view at its own size: the crop is resized to
that size first and everything after it works at that size (erasing and
cutmix boxes are normalised). A mixing view mixes its own render (every op
but the mixing) with its partner's own render; partners are mates in a random
perfect matching of the block, so a loader that keeps mates together renders
each image once for both mixes (``stages.replay``).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field, fields as dataclass_fields

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from storage import ArraySpec, UserError

from ..settings import NON_NEGATIVE, POSITIVE, PROB, Choice, Float, Int, Jitter, Optional, Seq, Text, check_fields, setting

# -- counter-based uniforms ------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64 (wraps on purpose)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, view: int, ids: np.ndarray, stream: int, count: int) -> np.ndarray:
    """Uniform floats in [0, 1), shape (len(ids), count), a pure function of the arguments.

    ``stream`` separates the ops, so adding an op never changes another op's draws.
    """
    ids = np.asarray(ids, dtype=np.uint64)
    h = _mix(np.full(1, seed, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
    h = _mix(h ^ np.uint64(view))
    h = _mix(h ^ np.uint64(stream))
    h = _mix(h ^ ids)[:, None]  # (n, 1)
    h = _mix(h ^ np.arange(count, dtype=np.uint64)[None, :])  # (n, count)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# -- ops -------------------------------------------------------------------------------------


class ViewOp:
    """One recorded augmentation.

    ``stream`` is the op's own counter stream (fixed per op, never reused).
    ``apply`` leaves the image alone when the op's fields are absent from
    ``params``: evaluation views carry only ``crop`` and ``flip``.
    """

    fields: dict[str, ArraySpec] = {}
    draws = 0  # uniforms needed per sample
    stream = -1
    mixes = False  # True for the op that mixes a view with its partner's (applied by the plan)

    def draw(self, u: np.ndarray, sizes: np.ndarray, ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Parameters for n samples from uniforms (n, draws), image sizes (n, 2) as (H, W) and their ids."""
        raise NotImplementedError

    def apply(self, image: torch.Tensor, params: dict, size: int) -> torch.Tensor:
        """Apply one sample's parameters to a uint8 (3, size, size) image (the crop: any image)."""
        raise NotImplementedError


class RandomResizedCrop(ViewOp):
    """torchvision's RandomResizedCrop, with the box recorded in normalised coordinates.

    The box is sampled in pixels (area fraction and aspect ratio as torchvision
    defines them) and stored as (top, left, height, width) fractions of the
    image, so it maps back to the same pixels on the same image.
    """

    fields = {"crop": ArraySpec((4,), "float32")}
    attempts = 10
    draws = 4 * attempts
    stream = 0

    def __init__(self, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def draw(self, u, sizes, ids=None):
        n = len(u)
        H, W = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
        u = u.reshape(n, self.attempts, 4)
        area = (H * W)[:, None] * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[..., 1]
        aspect = np.exp(log_r)
        w = np.round(np.sqrt(area * aspect))
        h = np.round(np.sqrt(area / aspect))
        ok = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
        first = np.argmax(ok, axis=1)  # first accepted attempt, as torchvision takes it
        pick = np.arange(n)
        w, h = w[pick, first], h[pick, first]
        top = np.floor(u[pick, first, 2] * (H - h + 1))
        left = np.floor(u[pick, first, 3] * (W - w + 1))
        # No attempt fits: torchvision's fallback, the largest centred crop within the ratio range.
        fallback = ~ok.any(axis=1)
        if fallback.any():
            in_ratio = W / H
            fw = np.where(in_ratio < self.ratio[0], W, np.where(in_ratio > self.ratio[1], np.round(H * self.ratio[1]), W))
            fh = np.where(in_ratio < self.ratio[0], np.round(W / self.ratio[0]), H)
            w, h = np.where(fallback, fw, w), np.where(fallback, fh, h)
            top = np.where(fallback, (H - h) // 2, top)
            left = np.where(fallback, (W - w) // 2, left)
        box = np.stack([top / H, left / W, h / H, w / W], axis=1)
        return {"crop": box.astype(np.float32)}

    def apply(self, image, params, size):
        # crop_interp: evaluation views only (``eval_params``); training crops resize bilinearly.
        interpolation = INTERPOLATIONS[int(params["crop_interp"])] if "crop_interp" in params else "bilinear"
        return crop_resize(image, params["crop"], size, interpolation)


class HorizontalFlip(ViewOp):
    fields = {"flip": ArraySpec((), "uint8")}
    draws = 1
    stream = 1

    def __init__(self, p=0.5):
        self.p = p

    def draw(self, u, sizes, ids=None):
        return {"flip": (u[:, 0] < self.p).astype(np.uint8)}

    def apply(self, image, params, size):
        return TF.horizontal_flip(image) if params.get("flip", 0) else image


def crop_resize(image: torch.Tensor, box, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Cut a normalised (top, left, height, width) box out of a uint8 image and resize it (antialiased)."""
    H, W = image.shape[-2:]
    top, left = int(round(float(box[0]) * H)), int(round(float(box[1]) * W))
    h = max(1, min(H - top, int(round(float(box[2]) * H))))
    w = max(1, min(W - left, int(round(float(box[3]) * W))))
    mode = TF.InterpolationMode.BICUBIC if interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
    return TF.resized_crop(image, top, left, h, w, [size, size], interpolation=mode, antialias=True)


def pixel_box(box, size: int) -> tuple[int, int, int, int]:
    """A normalised (top, left, height, width) box on a ``size`` x ``size`` view as pixel edges (y0, y1, x0, x1).

    Edges are rounded (not the extent), so the pixels are a pure function of
    the recorded float32 box and the size; an empty box gives y0 == y1 or x0 == x1.
    """
    top, left, h, w = (float(v) for v in box)
    y0, y1 = int(round(top * size)), int(round((top + h) * size))
    x0, x1 = int(round(left * size)), int(round((left + w) * size))
    return max(0, y0), min(size, y1), max(0, x0), min(size, x1)


def to_pil(image: torch.Tensor):
    """A uint8 (3, H, W) tensor as an RGB PIL image (the same bytes; Pillow interleaves the planes, 5x faster than a transpose)."""
    from PIL import Image

    if image.shape[0] != 3:
        return Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    planes = image.contiguous().numpy()
    h, w = planes.shape[1:]
    return Image.merge("RGB", [Image.frombuffer("L", (w, h), planes[k], "raw", "L", 0, 1) for k in range(3)])


def from_pil(image) -> torch.Tensor:
    """An RGB PIL image as a contiguous uint8 (3, H, W) tensor (the planes as Pillow splits them)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    return torch.from_numpy(np.stack([np.asarray(band) for band in image.split()]))


def _gauss(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Standard normals from two uniforms in [0, 1) (Box-Muller)."""
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2)


# -- RandAugment -----------------------------------------------------------------------------

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

INTERPOLATIONS = ("bilinear", "bicubic")  # timm's 'random' picks one of these per op call


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


# -- colour jitter ---------------------------------------------------------------------------


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


# -- random erasing --------------------------------------------------------------------------


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


# -- mixup / cutmix --------------------------------------------------------------------------


def pair_partners(ids: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Each id's mate in a uniformly random perfect matching of the distinct ``ids``, -1 for an id alone.

    The distinct ids are ordered by their own uniforms ``u`` (one per entry of
    ``ids``; ties by id) and paired off in that order, so the matching depends
    on the set of ids and their draws, never on the order of the call. With an
    odd count the last one mixes with the first of that order, whose own mate
    is another: then one image serves three views.
    """
    ids = np.asarray(ids, dtype=np.int64)
    pool, first = np.unique(ids, return_index=True)
    if len(pool) < 2:
        return np.full(len(ids), -1, np.int64)
    order = np.lexsort((pool, u[first]))  # a uniform random permutation of the pool
    mate = np.empty(len(pool), np.int64)
    even = len(order) - len(order) % 2
    mate[order[0:even:2]], mate[order[1:even:2]] = order[1:even:2], order[0:even:2]
    if even < len(order):
        mate[order[-1]] = order[0]
    return pool[mate[np.searchsorted(pool, ids)]]


def beta_quantile(alpha: float, u: np.ndarray) -> np.ndarray:
    """Beta(alpha, alpha) samples as the inverse CDF at uniforms ``u``."""
    if alpha == 1.0:
        return u.astype(np.float64)
    from scipy.special import betaincinv  # scipy comes with scikit-learn

    return betaincinv(alpha, alpha, u)


class MixupCutmix(ViewOp):
    """timm's Mixup/CutMix per sample (its 'elem' mode), partners paired within the same block.

    For each sample, with probability ``prob`` the view mixes; if both alphas
    are set, cutmix with probability ``switch_prob`` else mixup (timm's rule).
    ``mix_partner`` is the sample's mate in a random perfect matching of the
    ids drawn together (one whole block, ``pair_partners``), never the sample
    itself, -1 for no mixing. Mates mix with each other, as timm's batch mode
    pairs a batch with its flip, so each image is decoded and rendered once
    and both mixes come from the two renders; each keeps its own lambda and box. ``mix_lam`` (float64) is the share of the sample itself:
    the Beta(alpha, alpha) draw for mixup; for cutmix 1 - the area of the
    recorded box after clipping to the view (timm's ``correct_lam``).
    ``mix_box`` (top, left, height, width, normalised) is the cutmix box,
    zeros for mixup. ``lam_at`` gives the exact share at a render size.

    Mixup blends in float64 in a fixed order, ``x * lam + p * (1 - lam)``,
    rounds half to even (``torch.round``, as timm's collate uses ``np.rint``)
    and clamps to [0, 255]; cutmix pastes the partner's pixels of the box.
    """

    fields = {
        "mix_partner": ArraySpec((), "int64"),
        "mix_lam": ArraySpec((), "float64"),
        "mix_box": ArraySpec((4,), "float32"),
    }
    draws = 6
    stream = 5
    mixes = True
    MATCH = 5  # the column of the draws that orders the matching (``pair_partners``)
    GROUP_STREAM = 6  # the matching's own stream when a group of views shares it (``ViewPlan.draw``)

    def __init__(self, mixup_alpha=0.0, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5):
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob = float(prob), float(switch_prob)

    def draw(self, u, sizes, ids=None):
        n = len(u)
        if ids is None:
            raise ValueError("mixing draws need the sample ids of the block (partners come from it)")
        ids = np.asarray(ids, dtype=np.int64)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cut = u[:, 1] < self.switch_prob
        else:
            cut = np.full(n, self.cutmix_alpha > 0)
        lam = np.where(cut, beta_quantile(self.cutmix_alpha or 1.0, u[:, 2]), beta_quantile(self.mixup_alpha or 1.0, u[:, 2]))
        partner = np.where((u[:, 0] < self.prob), pair_partners(ids, u[:, 5]), -1)
        mix = partner >= 0
        # Cutmix box: a square of side sqrt(1 - lam) around a uniform centre, clipped to the view (timm's rand_bbox).
        side = np.sqrt(1.0 - lam)
        cy, cx = u[:, 3], u[:, 4]
        y0, y1 = np.clip(cy - side / 2, 0, 1), np.clip(cy + side / 2, 0, 1)
        x0, x1 = np.clip(cx - side / 2, 0, 1), np.clip(cx + side / 2, 0, 1)
        box = np.where((cut & mix)[:, None], np.stack([y0, x0, y1 - y0, x1 - x0], axis=1), 0.0).astype(np.float32)
        box64 = box.astype(np.float64)
        lam = np.where(cut, 1.0 - box64[:, 2] * box64[:, 3], lam)  # the recorded box's own area
        return {"mix_partner": partner.astype(np.int64), "mix_lam": np.where(mix, lam, 1.0), "mix_box": box}

    def apply(self, image, params, size):
        return image  # mixing needs the partner's view: ``ViewPlan.render`` calls ``mix``

    def mix(self, view: torch.Tensor, partner: torch.Tensor, params: dict) -> torch.Tensor:
        box = params["mix_box"]
        if float(box[2]) > 0 and float(box[3]) > 0:
            y0, y1, x0, x1 = pixel_box(box, view.shape[-1])
            view = view.clone()
            view[:, y0:y1, x0:x1] = partner[:, y0:y1, x0:x1]
            return view
        lam = float(params["mix_lam"])
        # x * lam + p * (1 - lam) in float64, rounded, for each of the 256 x 256 pixel pairs: the same float
        # operations as on the whole view, element by element, so a table lookup gives the same bytes, faster.
        levels = torch.arange(256, dtype=torch.float64)
        table = torch.round(levels[:, None] * lam + levels[None, :] * (1.0 - lam)).clamp_(0, 255).to(torch.uint8)
        pairs = (view.to(torch.int32) << 8) | partner.to(torch.int32)  # x * 256 + p
        return table.view(-1).index_select(0, pairs.reshape(-1)).view(view.shape)

    @staticmethod
    def lam_at(params: dict, size: int) -> float:
        """The share of the sample's own pixels in its view at ``size`` (1.0 when it does not mix)."""
        if "mix_partner" not in params or int(params["mix_partner"]) < 0:
            return 1.0
        box = params["mix_box"]
        if float(box[2]) > 0 and float(box[3]) > 0:
            y0, y1, x0, x1 = pixel_box(box, size)
            return 1.0 - max(0, y1 - y0) * max(0, x1 - x0) / float(size * size)
        return float(params["mix_lam"])


def mixed_targets(labels, partner_labels, lam, num_classes: int, smoothing: float = 0.0):
    """timm's mixed, smoothed one-hot targets: ``(targets (B, C) float32, labelled (B,) bool)``.

    Row b is ``lam_b * smooth(y_b) + (1 - lam_b) * smooth(y_partner_b)`` with
    smooth(y) = (1 - smoothing) * onehot(y) + smoothing / C, computed in float64.
    A row is labelled when its own label is known (>= 0) and, if any of it comes
    from a partner (lam < 1), the partner's too; unlabelled rows are zeros.
    """
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    partner = torch.as_tensor(np.asarray(partner_labels), dtype=torch.int64)
    lam = torch.as_tensor(np.asarray(lam, dtype=np.float64), dtype=torch.float64)
    off = smoothing / num_classes
    on = 1.0 - smoothing + off

    def onehot(y):
        return torch.full((len(y), num_classes), off, dtype=torch.float64).scatter_(1, y.clamp(min=0)[:, None], on)

    mask = (labels >= 0) & ((partner >= 0) | (lam >= 1.0))
    targets = onehot(labels) * lam[:, None] + onehot(partner) * (1.0 - lam)[:, None]
    targets[~mask] = 0.0
    return targets.to(torch.float32), mask


# -- the recipe ------------------------------------------------------------------------------

# Fields added after the first store format: left out of ``to_dict`` while every added
# augmentation is off, so stores made before them keep matching the default recipe.
_ADDED = (
    "randaugment",
    "ra_interpolation",
    "color_jitter",
    "erase_prob",
    "erase_area",
    "erase_aspect",
    "mixup_alpha",
    "cutmix_alpha",
    "mix_prob",
    "mix_switch_prob",
    "fill",
    "mix_pair_views",
)


@dataclass(frozen=True)
class ViewRecipe:
    """How views are drawn, timm's training transforms as recorded ops. Saved in the store; two stores agree only
    if recipes and seeds do. Each field is declared once here: its check, its help (the flags and YAML keys of
    every command derive from it, ``stages.settings``)."""

    scale: tuple[float, float] = setting((0.08, 1.0), Seq(Float(0.0, 1.0, lo_open=True)), "RandomResizedCrop area range")
    ratio: tuple[float, float] = setting((3 / 4, 4 / 3), Seq(POSITIVE), "RandomResizedCrop aspect range", show_default="0.75 1.333")
    hflip: float = setting(0.5, PROB, "horizontal flip probability")
    eval_crop: float = setting(0.875, Float(0.0, 1.0, lo_open=True), "centre-crop fraction of evaluation views (timm's crop_pct)")
    eval_interpolation: str = setting("bilinear", Choice(INTERPOLATIONS), "how evaluation crops are resized (timm's RSB A1/A2 evaluate bicubic)")
    randaugment: str | None = setting(None, Optional(RandAugmentText()), "timm's RandAugment string, e.g. rand-m9-mstd0.5-inc1", show_default="off")
    ra_interpolation: str = setting(
        "random", Choice(("random", *INTERPOLATIONS)), "resampling of RandAugment's geometric ops: random (timm's: one of the two per op, recorded), bilinear, bicubic"
    )
    color_jitter: float | tuple[float, ...] | None = setting(
        None, Optional(Jitter()), "colour jitter: one value, or B,C,S[,H] (brightness, contrast, saturation, hue); timm turns it off under RandAugment", show_default="off"
    )
    erase_prob: float = setting(0.0, PROB, "timm's RandomErasing probability (one box, constant fill)")
    erase_area: tuple[float, float] = setting((0.02, 1 / 3), Seq(Float(0.0, 1.0, lo_open=True, hi_open=True)), "RandomErasing area range", show_default="0.02 0.333")
    erase_aspect: tuple[float, float] = setting((0.3, 1 / 0.3), Seq(POSITIVE), "RandomErasing aspect range", show_default="0.3 3.333")
    mixup_alpha: float = setting(0.0, NON_NEGATIVE, "timm's Mixup alpha; 0 turns mixup off")
    cutmix_alpha: float = setting(0.0, NON_NEGATIVE, "timm's CutMix alpha; 0 turns cutmix off")
    mix_prob: float = setting(1.0, PROB, "share of views that mix, when mixup or cutmix is on")
    mix_switch_prob: float = setting(0.5, PROB, "share of mixing views that use cutmix when both are on")
    mix_pair_views: int = setting(
        1, Int(1, 1000), "views 0..K-1, K..2K-1, ... each mix a sample with one partner (its own lambda and box per view): with K = the "
        "repeats of training, a sample's repeated views and its partner's render from one decode each, as timm's RepeatAugSampler with "
        "batch mixing gives on one process; 1 draws a partner per view")
    fill: tuple[int, int, int] = setting((124, 116, 104), Seq(Int(0, 255), n=3, ordered=False), "uint8 colour of uncovered and erased pixels (the ImageNet mean)")

    def __post_init__(self):
        # YAML and JSON give lists; the recipe holds tuples so that it stays hashable and comparable.
        for f in dataclass_fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        # Every field against its one declaration, however the recipe was made (YAML, flags, Python, a store):
        # a bad setting fails at set-up, not in a loader worker.
        check_fields(ViewRecipe, {f.name: getattr(self, f.name) for f in dataclass_fields(self)}, "the view recipe")
        self.ops()  # and what only an op can check: the RandAugment string

    def ops(self) -> list[ViewOp]:
        ops: list[ViewOp] = [RandomResizedCrop(self.scale, self.ratio), HorizontalFlip(self.hflip)]
        if self.randaugment:
            ops.append(RandAugment(self.randaugment, self.fill, self.ra_interpolation))
        if self.color_jitter is not None and any(normalise_jitter(self.color_jitter)):
            ops.append(ColorJitter(self.color_jitter))
        if self.erase_prob > 0:
            ops.append(RandomErasing(self.erase_prob, self.erase_area, self.erase_aspect, self.fill))
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0:
            ops.append(MixupCutmix(self.mixup_alpha, self.cutmix_alpha, self.mix_prob, self.mix_switch_prob))
        return ops

    def augments(self) -> bool:
        """Whether any augmentation beyond crop and flip is on."""
        return len(self.ops()) > 2

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not self.augments():
            d = {k: v for k, v in d.items() if k not in _ADDED}
        if self.eval_interpolation == "bilinear":  # the default, left out so that the default recipe's record stays as it was
            del d["eval_interpolation"]
        if d.get("mix_pair_views") == 1:  # as for eval_interpolation: recipes recorded before the setting stay equal
            del d["mix_pair_views"]
        return d

    @classmethod
    def from_dict(cls, d: dict, where: str = "a view recipe") -> "ViewRecipe":
        """The recipe ``to_dict`` (or a store's record) describes, every value checked as a flag's would be."""
        return cls(**check_fields(cls, d, where))


@dataclass
class ViewPlan:
    """A recipe plus a seed: draws any view's parameters on demand."""

    recipe: ViewRecipe = field(default_factory=ViewRecipe)
    seed: int = 0

    def __post_init__(self):
        self.ops = self.recipe.ops()
        self.mixer = next((op for op in self.ops if op.mixes), None)

    @property
    def fields(self) -> dict[str, ArraySpec]:
        return {name: spec for op in self.ops for name, spec in op.fields.items()}

    def draw(self, view: int, ids: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
        """Parameters of ``view`` for samples ``ids`` (with image sizes (n, 2)).

        Every field but ``mix_partner`` depends on (seed, view, id) alone; the
        partner is drawn among ``ids`` (from the view's group of ``mix_pair_views``), so draw one whole block per call.
        """
        ids = np.asarray(ids)
        params = {}
        for op in self.ops:
            u = uniforms(self.seed, view, ids, op.stream, op.draws)
            if op.mixes and self.recipe.mix_pair_views > 1:
                # One matching for the view's group: every view of it pairs a sample with the same partner.
                group = view // self.recipe.mix_pair_views
                u[:, op.MATCH] = uniforms(self.seed, group, ids, op.GROUP_STREAM, 1)[:, 0]
            drawn = op.draw(u, sizes, ids)
            # Cast to the stored dtypes now: a drawn view renders exactly as its stored record.
            params.update({k: np.asarray(v, dtype=op.fields[k].dtype) for k, v in drawn.items()})
        return params

    def render_own(self, image: torch.Tensor, params: dict, size: int) -> torch.Tensor:
        """A view before mixing: every op but the mixing one."""
        for op in self.ops:
            if not op.mixes:
                image = op.apply(image, params, size)
        return image

    def render(self, image: torch.Tensor, params: dict, size: int, partner: tuple | None = None) -> torch.Tensor:
        """One view of a uint8 (3, H, W) image at ``size``: the same bytes on any machine.

        A view that mixes needs ``partner = (partner image, partner params)``:
        the partner's own view of the same view index, rendered here at ``size``.
        """
        view = self.render_own(image, params, size)
        if self.mixer is not None and int(params.get("mix_partner", -1)) >= 0:
            if partner is None:
                raise ValueError(f"this view mixes with sample {int(params['mix_partner'])}: pass partner=(image, params)")
            view = self.mixer.mix(view, self.render_own(partner[0], partner[1], size), params)
        return view

    def lam(self, params: dict, size: int) -> float:
        """The share of the sample's own image in its view at ``size`` (1.0 without mixing)."""
        return MixupCutmix.lam_at(params, size) if self.mixer is not None else 1.0

    def describe(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "seed": self.seed}


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


def normalize(views: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, the one normalisation every model input goes through.

    Args:
        views: uint8 images (B, 3, H, W), on any device (run it on the GPU: a quarter of float32's bytes cross the bus).
        mean, std: per channel, on the 0..1 scale (timm's ``pretrained_cfg["mean"]``, ``["std"]``).

    Returns:
        float32 (B, 3, H, W): ``(views / 255 - mean) / std``, in that order (the order fixes the bits).

    Example:
        >>> x = normalize(batch.images.to("cuda", non_blocking=True), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    """
    mean = torch.tensor(mean, dtype=torch.float32, device=views.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=views.device).view(1, -1, 1, 1)
    # In place on a float copy of its own: the same operations in the same order (the same bits), 3x faster on a CPU.
    return views.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)
