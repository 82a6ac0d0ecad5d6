"""The op interface and the geometric ops every recipe has (crop, flip), the image conversions they share, and the
one normalisation of model inputs."""

from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from storage import ArraySpec


INTERPOLATIONS = ("bilinear", "bicubic")  # timm's 'random' picks one of these per op call


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
            fw = np.where(
                in_ratio < self.ratio[0], W, np.where(in_ratio > self.ratio[1], np.round(H * self.ratio[1]), W)
            )
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


def normalize(views: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32, the one normalisation every model input goes through.

    Args:
        views: uint8 images (B, 3, H, W), on any device (run it on the GPU: a quarter of float32's bytes cross the bus).
        mean: per channel, on the 0..1 scale (timm's ``pretrained_cfg["mean"]``).
        std: per channel, on the 0..1 scale (timm's ``pretrained_cfg["std"]``).

    Returns:
        float32 (B, 3, H, W): ``(views / 255 - mean) / std``, in that order (the order fixes the bits).

    Example:
        >>> x = normalize(batch.images.to("cuda", non_blocking=True), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    """
    mean = torch.tensor(mean, dtype=torch.float32, device=views.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32, device=views.device).view(1, -1, 1, 1)
    # In place on a float copy of its own: the same operations in the same order (the same bits), 3x faster on a CPU.
    return views.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)
