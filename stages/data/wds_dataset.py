"""Image shards as the input dataset: ``wds:PATTERN``, webdataset tar shards, local or at an fsspec URL.

``PATTERN`` is a brace pattern (``train-{0000..1023}.tar``) or a glob, of local
paths or URLs (``s3://bucket/in1k/train-{0000..1023}.tar``). A sample is a run
of members sharing a key (webdataset's convention, what timm's ImageNet shards
hold): one image ``KEY.jpg|jpeg|png|webp`` and its class ``KEY.cls`` (a decimal
integer); other members (``KEY.json``...) are ignored.

* Ids: shard order (as the pattern lists them), then member order. Keys are
  ``<shard name>/<KEY>``; the fingerprint covers them, the labels, and each
  shard's name and sample count, so moving the shards elsewhere keeps it.
* The index: opening needs every sample's key, label, image size and byte
  range, found in one streaming pass over each shard and cached locally
  (``stages.data.wds_index``), so later opens read no image data.
* Classes: numbers (``"0"``, ``"1"``, ...), or the names a ``manifest.json``
  beside the shards gives when it lists them all (``pipeline prepare``
  writes one, ``stages.data.prepare``).
* Reading: the images of a unit's block are neighbours in the shards, so
  ``encoded`` reads them with one ranged read per run of neighbouring members
  and the bytes travel with the unit's rows to the loader workers, which
  decode them. ``image(i)`` reads one member (the odd random access).

A store made from shards keeps its blocks in this id order (``sequential``):
a block is a random sample of the data only if the shards were shuffled when
written, and ``order_note`` says when they were not.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from storage import UserError
from storage.store_record import MAX_CLASSES

from .decode import decode_image
from .image_dataset import ImageDataset
from .wds_index import expand, file_system, manifest_classes, shard_index


GAP = 256 << 10  # neighbouring members closer than this are read in one request (headers and .cls between them)


class WdsDataset(ImageDataset):
    """Samples of webdataset tar shards (see the module docstring)."""

    sequential = True

    def __init__(self, pattern: str):
        self.pattern, self.source = pattern, f"wds:{pattern}"
        self.urls = expand(pattern)
        if not self.urls:
            raise UserError(
                f"wds pattern '{pattern}' matches no shard: check the path or URL (a brace pattern such as train-{{0000..0099}}.tar, or a glob)"
            )
        with ThreadPoolExecutor(max_workers=min(8, len(self.urls))) as pool:
            shards = list(pool.map(shard_index, self.urls))
        self.names = [url.rstrip("/").rsplit("/", 1)[-1] for url in self.urls]
        self.counts = np.asarray([len(s.keys) for s in shards], np.int64)
        if not self.counts.sum():
            raise UserError(
                f"wds pattern '{pattern}' names {len(self.urls)} shard(s) with no samples in them (KEY.jpg plus KEY.cls)"
            )
        self.keys = [f"{name}/{key}" for name, s in zip(self.names, shards) for key in s.keys]
        self.labels = np.concatenate([s.labels for s in shards])
        self.shard = np.repeat(np.arange(len(shards)), self.counts)  # (N,) the shard of each sample
        self.ext = [e for s in shards for e in s.ext]
        self.offset = np.concatenate([s.offset for s in shards])
        self.length = np.concatenate([s.length for s in shards])
        self._sizes = np.concatenate([s.hw for s in shards])
        found = int(self.labels.max()) + 1
        # a damaged .cls (or cached index) would size a list of billions of names
        if found > MAX_CLASSES or self.labels.min() < 0:
            j = int(np.argmax(self.labels)) if found > MAX_CLASSES else int(np.argmin(self.labels))
            raise UserError(
                f"{self.keys[j]} has class {self.labels[j]}: classes are numbers from 0 to {MAX_CLASSES - 1:,}; fix its .cls member"
            )
        named = manifest_classes(self.urls, self.names)  # shards made by `pipeline prepare` carry their class names
        if named is not None and len(named) < found:
            named = None  # fewer names than the labels need: numbers instead
        # validation shards are checked against the training classes (``check_classes``)
        self.classes = named or [str(c) for c in range(found)]
        self._fs = None

    def __getstate__(self):
        return {**self.__dict__, "_fs": None}  # file systems are opened again in each process

    def _read(self, shard: int, start: int, end: int) -> bytes:
        if self._fs is None:
            self._fs = {}
        url = self.urls[shard]
        if url not in self._fs:
            self._fs[url] = file_system(url)
        fs, path = self._fs[url]
        try:
            return fs.cat_file(path, start=int(start), end=int(end))
        except FileNotFoundError:
            raise UserError(f"shard {url} is gone: the dataset changed since it was opened") from None

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(json.dumps([self.names, self.counts.tolist()]).encode())
        return h.hexdigest()[:32]

    def sizes(self) -> np.ndarray:
        return self._sizes

    def encoded(self, ids) -> np.ndarray:
        """The images of ``ids`` as bytes, one ranged read per run of neighbouring members of a shard."""
        ids = np.asarray(ids, np.int64)
        out = np.empty(len(ids), object)
        if not len(ids):
            return out
        order = np.argsort(ids, kind="stable")
        s = ids[order]
        start, end = self.offset[s], self.offset[s] + self.length[s]
        new_run = np.r_[
            True, (self.shard[s][1:] != self.shard[s][:-1]) | (start[1:] - end[:-1] > GAP) | (start[1:] < start[:-1])
        ]
        bounds = np.r_[np.flatnonzero(new_run), len(s)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            first = int(start[lo])
            blob = self._read(int(self.shard[s[lo]]), first, int(end[lo:hi].max()))
            for k in range(lo, hi):
                out[order[k]] = blob[start[k] - first : end[k] - first]
        return out

    def decode(self, i: int, data: bytes) -> torch.Tensor:
        key = self.keys[i].split("/", 1)[1]
        try:
            return decode_image(data, f"shard {self.urls[self.shard[i]]}: sample {key}")
        except Exception as e:
            raise UserError(
                f"shard {self.urls[self.shard[i]]}: sample {key}: cannot decode its image {key}.{self.ext[i]} ({e}); replace or remove the sample"
            ) from None

    def image(self, i: int) -> torch.Tensor:
        return self.decode(i, self.encoded([i])[0])

    def order_note(self) -> str | None:
        """One line when the samples are in class order (blocks then hold few classes), else None."""
        labels = self.labels
        same = class_order(labels)
        if same is None:
            return None
        shares = [np.bincount(labels[self.shard == k]).max() / c if c else 0.0 for k, c in enumerate(self.counts)]
        k = int(np.argmax(shares))
        return (
            f"{self.source}: the samples are in class order ({same:.0%} of neighbouring samples share a class; the commonest class of "
            f"shard {self.names[k]} is {shares[k]:.0%} of it): blocks follow the shards, so batches and mixing partners will mostly share a class; "
            "shuffle the samples when writing the shards"
        )


def class_order(labels: np.ndarray) -> float | None:
    """The share of neighbouring samples with the same class when it says the samples are in class order (over half,
    and three times what a shuffle gives: about sum(p_c^2)), else None."""
    if len(labels) < 8 or np.count_nonzero(np.bincount(labels)) < 2:
        return None
    same = float(np.mean(labels[1:] == labels[:-1]))
    expected = float(np.sum((np.bincount(labels) / len(labels)) ** 2))
    return None if same < 0.5 or same < 3 * expected else same
