"""A folder of images, one sub-folder per class (``folder:PATH``, like torchvision's ImageFolder).

Files are sorted by path, so ids are stable; opening reads only image headers, which also finds unreadable and
truncated files before any work starts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from storage import UserError

from .decode import decode_image, header_size
from .image_dataset import IMAGE_EXTENSIONS, ImageDataset


def _check_class_layout(root: Path, keys: list[str], labels: np.ndarray, classes: list[str]) -> None:
    """Refuse a folder whose classes sit one level down (``folder:PARENT`` of ``train/<class>/``): read as it is, it
    would be one class per split, every image of a split with the same label."""
    used = sorted({classes[c] for c in labels})
    inner = sorted({Path(k).parts[1] for k in keys if len(Path(k).parts) > 2})
    # no image directly in its class; more sub-folders than classes
    if all(len(Path(k).parts) > 2 for k in keys) and len(inner) > len(used):
        raise UserError(
            f"{root} reads as {len(used)} class(es) ({', '.join(used[:3])}) whose images all sit in {len(inner)} sub-folders "
            f"({', '.join(inner[:3])}, ...), which look like the classes: pass folder:{root / used[0]} (one sub-folder per class)"
        )


# What to do about an unreadable image: removing it changes the data, which a store made from the folder then refuses.
BAD_IMAGE_FIX = "replace the file, or remove it and write a new store (--store) or run: a store made from this folder refuses changed data"


class FolderDataset(ImageDataset):
    """One sub-folder per class; files sorted by path, so ids are stable."""

    def __init__(self, root: str):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(
                f"dataset folder {self.root} does not exist: pass --data folder:PATH with one sub-folder per class"
            )
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        self.classes = found
        self.keys, labels = [], []
        for label, name in enumerate(found):
            for p in sorted((self.root / name).rglob("*")):
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file():
                    self.keys.append(str(p.relative_to(self.root)))
                    labels.append(label)
        if not self.keys:
            raise UserError(
                f"no images found under {self.root}: expected {self.root}/<class>/<image>{IMAGE_EXTENSIONS[:3]}"
            )
        self.labels = np.asarray(labels, dtype=np.int64)
        _check_class_layout(self.root, self.keys, self.labels, found)
        self.source = f"folder:{self.root}"
        self._sizes = None

    def _open(self, i):
        from PIL import Image

        path = self.root / self.keys[i]
        try:
            return Image.open(path)
        except Exception as e:
            raise UserError(f"cannot read image {path}: {e}; {BAD_IMAGE_FIX}") from e

    def image(self, i):
        path = self.root / self.keys[i]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read image {path}: {e}; {BAD_IMAGE_FIX}") from e
        try:
            return decode_image(data, str(path))
        except Exception as e:
            raise UserError(f"cannot decode image {path}: {e}; {BAD_IMAGE_FIX}") from e

    def sizes(self):
        # Only image headers (and the last bytes) are read here; this also finds unreadable and truncated files before
        # any work starts, so a command refuses them before it makes its --out or --store.
        if self._sizes is None:
            sizes = np.zeros((len(self), 2), np.int64)
            for i in range(len(self)):
                with self._open(i) as im:
                    try:
                        sizes[i] = header_size(im, str(self.root / self.keys[i]))
                    except Exception as e:
                        raise UserError(f"cannot decode image {self.root / self.keys[i]}: {e}; {BAD_IMAGE_FIX}") from e
            self._sizes = sizes
        return self._sizes
