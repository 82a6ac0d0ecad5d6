"""Two small datasets made in memory, for the demo, tests and benchmarks: ``digits`` (scikit-learn's handwritten
digits) and ``fake:N`` (synthetic images made from the sample id alone). Both have their own validation split."""

from __future__ import annotations

import numpy as np
import torch

from .image_dataset import ImageDataset


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
