"""Recorded augmented views: parameters drawn once, stored, and replayed exactly.

A view's parameters are a pure function of (plan seed, view index, sample id),
drawn from a counter-based hash rather than a stateful generator, so any
subset of views can be drawn in any order by any worker. Each augmentation is
a ``ViewOp``: it names the fields it records, draws them for a batch of
samples (vectorised), and applies one sample's fields to a uint8 image.
Adding RandAugment, erasing or mixup means adding ops with more fields; the
store records whatever fields the ops declare.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from storage import ArraySpec

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
    """One recorded augmentation."""

    fields: dict[str, ArraySpec] = {}
    draws = 0  # uniforms needed per sample

    def draw(self, u: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
        """Parameters for n samples from uniforms (n, draws) and image sizes (n, 2) as (H, W)."""
        raise NotImplementedError

    def apply(self, image: torch.Tensor, params: dict, size: int) -> torch.Tensor:
        """Apply one sample's parameters to a uint8 (3, H, W) image."""
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

    def __init__(self, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def draw(self, u, sizes):
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
        return crop_resize(image, params["crop"], size)


class HorizontalFlip(ViewOp):
    fields = {"flip": ArraySpec((), "uint8")}
    draws = 1

    def __init__(self, p=0.5):
        self.p = p

    def draw(self, u, sizes):
        return {"flip": (u[:, 0] < self.p).astype(np.uint8)}

    def apply(self, image, params, size):
        return TF.horizontal_flip(image) if params["flip"] else image


def crop_resize(image: torch.Tensor, box, size: int) -> torch.Tensor:
    """Cut a normalised (top, left, height, width) box out of a uint8 image and resize it."""
    H, W = image.shape[-2:]
    top, left = int(round(float(box[0]) * H)), int(round(float(box[1]) * W))
    h = max(1, min(H - top, int(round(float(box[2]) * H))))
    w = max(1, min(W - left, int(round(float(box[3]) * W))))
    return TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)


# -- the recipe ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewRecipe:
    """How views are drawn. Saved in the store; two stores agree only if recipes and seeds do."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    eval_crop: float = 0.875  # centre-crop fraction for evaluation views

    def ops(self) -> list[ViewOp]:
        return [RandomResizedCrop(self.scale, self.ratio), HorizontalFlip(self.hflip)]

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ViewRecipe":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class ViewPlan:
    """A recipe plus a seed: draws any view's parameters on demand."""

    recipe: ViewRecipe = field(default_factory=ViewRecipe)
    seed: int = 0

    def __post_init__(self):
        self.ops = self.recipe.ops()

    @property
    def fields(self) -> dict[str, ArraySpec]:
        return {name: spec for op in self.ops for name, spec in op.fields.items()}

    def draw(self, view: int, ids: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
        """Parameters of ``view`` for samples ``ids`` (with image sizes (n, 2))."""
        params = {}
        for stream, op in enumerate(self.ops):
            params.update(op.draw(uniforms(self.seed, view, ids, stream, op.draws), sizes))
        return params

    def render(self, image: torch.Tensor, params: dict, size: int) -> torch.Tensor:
        """One view of a uint8 (3, H, W) image at ``size``: the same bytes on any machine."""
        for op in self.ops:
            image = op.apply(image, params, size)
        return image

    def describe(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "seed": self.seed}


def eval_params(sizes: np.ndarray, crop: float) -> dict[str, np.ndarray]:
    """Deterministic evaluation views: a centred square crop of ``crop`` times the shorter side."""
    H, W = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    side = np.maximum(1, np.round(crop * np.minimum(H, W)))
    box = np.stack([(H - side) // 2 / H, (W - side) // 2 / W, side / H, side / W], axis=1)
    return {"crop": box.astype(np.float32), "flip": np.zeros(len(sizes), np.uint8)}


def row(params: dict[str, np.ndarray], j: int) -> dict:
    """One sample's parameters out of a column table."""
    return {k: v[j] for k, v in params.items()}


def fingerprint(view: torch.Tensor) -> int:
    """A small checksum of a rendered uint8 view; stage two compares its replay against it."""
    return zlib.crc32(view.contiguous().numpy().tobytes())


def normalize(views: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, the one normalisation every model input goes through."""
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (views.float() / 255.0 - mean) / std
