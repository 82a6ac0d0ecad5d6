"""Image datasets with stable integer ids, labels and a fingerprint.

Every sample ``i`` in ``range(len(ds))`` has a key (a stable name), a label and
an image returned as a uint8 (3, H, W) tensor. The fingerprint hashes count,
keys and labels, so a store made from one dataset is never used with another.

Sources (``open_dataset``):
  digits          scikit-learn's handwritten digits, upscaled to 32 px RGB, fixed stratified split
  folder:PATH     one sub-folder per class, like torchvision's ImageFolder
  fake:N          N synthetic images (options: fake:N?size=64&classes=10), for tests and benchmarks
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch

from storage import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageDataset:
    """Base class: subclasses set ``source``, ``keys``, ``labels``, ``classes`` and implement ``image``."""

    source: str
    keys: list[str]
    labels: np.ndarray  # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def sizes(self) -> np.ndarray:
        """(N, 2) image heights and widths; the view plan needs them to place crops."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(str(len(self)).encode())
        h.update("\n".join(self.keys).encode())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return h.hexdigest()[:32]

    def describe(self) -> dict:
        return {
            "source": self.source,
            "fingerprint": self.fingerprint(),
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "classes": list(self.classes),
        }


class DigitsDataset(ImageDataset):
    """scikit-learn's 1,797 8x8 digits, upscaled to 32x32 RGB; every fifth of each class is val."""

    size = 32

    def __init__(self, split: str = "train"):
        from sklearn.datasets import load_digits

        digits = load_digits()
        labels = digits.target.astype(np.int64)
        # A fixed stratified split with no RNG in it: per class, every fifth sample is validation.
        is_val = np.zeros(len(labels), bool)
        for c in range(10):
            is_val[np.flatnonzero(labels == c)[::5]] = True
        keep = np.flatnonzero(is_val if split == "val" else ~is_val)
        self.source, self.split = "digits", split
        self.keys = [f"digits/{i}" for i in keep]
        self.labels = labels[keep]
        self.classes = [str(c) for c in range(10)]
        gray = torch.from_numpy(digits.images[keep]).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
        big = torch.nn.functional.interpolate(gray, size=(self.size, self.size), mode="bilinear", align_corners=False)
        self.images = (big.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()

    def image(self, i):
        return self.images[i]

    def sizes(self):
        return np.full((len(self), 2), self.size, np.int64)


class FakeDataset(ImageDataset):
    """Synthetic images: a class colour plus per-sample noise, made from the sample id alone."""

    def __init__(self, count: int, size: int = 32, classes: int = 10, split: str = "train"):
        self.source, self.split, self.size = f"fake:{count}", split, size
        offset = 0 if split == "train" else 10**9  # val images differ from train images
        self.ids = np.arange(count) + offset
        self.keys = [f"fake{size}/{split}/{i}" for i in range(count)]  # the size is part of what the data is
        self.labels = (np.arange(count) % classes).astype(np.int64)
        self.classes = [f"class{c}" for c in range(classes)]

    def image(self, i):
        g = torch.Generator().manual_seed(int(self.ids[i]))
        label = int(self.labels[i])
        base = torch.tensor([(37 * label) % 256, (91 * label) % 256, (151 * label) % 256], dtype=torch.int16)
        noise = torch.randint(-60, 61, (3, self.size, self.size), generator=g, dtype=torch.int16)
        return (base.view(3, 1, 1) + noise).clamp(0, 255).to(torch.uint8)

    def sizes(self):
        return np.full((len(self), 2), self.size, np.int64)


class FolderDataset(ImageDataset):
    """One sub-folder per class; files sorted by path, so ids are stable."""

    def __init__(self, root: str, classes: list[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"dataset folder {self.root} does not exist: pass --data folder:PATH with one sub-folder per class")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if classes is not None and found != list(classes):
            raise UserError(
                f"{self.root} has classes {found[:5]}... but the training data has {list(classes)[:5]}...: "
                "the validation folder must have the same class sub-folders"
            )
        self.classes = found
        self.keys, labels = [], []
        for label, name in enumerate(found):
            for p in sorted((self.root / name).rglob("*")):
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                    self.keys.append(str(p.relative_to(self.root)))
                    labels.append(label)
        if not self.keys:
            raise UserError(f"no images found under {self.root}: expected {self.root}/<class>/<image>{IMAGE_EXTENSIONS[:3]}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.source = f"folder:{self.root}"
        self._sizes = None

    def _open(self, i):
        from PIL import Image

        path = self.root / self.keys[i]
        try:
            return Image.open(path)
        except Exception as e:
            raise UserError(f"cannot read image {path}: {e}; remove or replace the file") from e

    def image(self, i):
        from torchvision.transforms.v2.functional import pil_to_tensor

        try:
            with self._open(i) as im:
                return pil_to_tensor(im.convert("RGB"))
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot decode image {self.root / self.keys[i]}: {e}; remove or replace the file") from e

    def sizes(self):
        # Only image headers are read here; this also finds unreadable files before any work starts.
        if self._sizes is None:
            sizes = np.zeros((len(self), 2), np.int64)
            for i in range(len(self)):
                with self._open(i) as im:
                    sizes[i] = (im.height, im.width)
            self._sizes = sizes
        return self._sizes


def open_dataset(source: str, split: str = "train", val_source: str | None = None) -> ImageDataset:
    """The dataset named by ``source``; ``split="val"`` gives its validation part."""
    kind, _, rest = source.partition(":")
    if kind == "digits" and not rest:
        return DigitsDataset(split)
    if kind == "fake" and rest:
        count, _, query = rest.partition("?")
        opts = {k: int(v) for k, v in parse_qsl(query)}
        try:
            n = int(count) if split == "train" else max(int(count) // 5, 1)
            data = FakeDataset(n, split=split, **opts)
        except (ValueError, TypeError) as e:
            raise UserError(f"bad fake dataset '{source}': {e}; use fake:N or fake:N?size=64&classes=10") from e
        # The whole spec, so that a store's recorded source reopens the same images.
        data.source = f"fake:{int(count)}?size={data.size}&classes={len(data.classes)}"
        return data
    if kind == "folder" and rest:
        if split == "train":
            return FolderDataset(rest)
        if not val_source:
            raise UserError(f"folder dataset {rest} has no validation split: pass --val-data folder:PATH")
        train_classes = sorted(p.name for p in Path(rest).iterdir() if p.is_dir())
        val = val_source.partition(":")[2] if val_source.startswith("folder:") else val_source
        return FolderDataset(val, classes=train_classes)
    raise UserError(f"unknown dataset '{source}': use digits, folder:PATH or fake:N")


def validation_data(source: str, val_source: str | None) -> ImageDataset | None:
    """The validation split of ``source``: its own for digits and fake, ``val_source`` for folders (or none)."""
    if source.startswith("folder:") and not val_source:
        log.warning("no validation data: pass --val-data folder:PATH to evaluate each epoch")
        return None
    return open_dataset(source, "val", val_source)
