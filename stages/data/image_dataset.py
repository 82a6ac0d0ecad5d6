"""The interface every image source implements: stable integer ids, keys, labels, images and a fingerprint."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

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

    # Sources whose images live in shards read front to back (tar files, often remote) read a whole
    # unit's images in one pass and send the bytes along with its rows; the others read by id.
    sequential = False  # True: blocks must follow the id order (the source cannot be permuted cheaply)

    def encoded(self, ids: np.ndarray) -> np.ndarray | None:
        """The encoded images of ``ids`` (an object array of bytes), read in one pass; None: read each by id."""
        return None

    def decode(self, i: int, data: bytes) -> torch.Tensor:
        """Image ``i`` as a uint8 (3, H, W) tensor from its bytes as ``encoded`` gave them."""
        raise NotImplementedError

    def order_note(self) -> str | None:
        """One line when the source's order puts classes together where blocks must follow it (``sequential``), else None."""
        return None

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
