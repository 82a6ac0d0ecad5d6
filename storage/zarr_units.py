"""The zarr backend: a group of [V, N, ...] zarr v3 arrays, one shard per (view, block) unit.

Every array is view-major and sharded so that one shard holds one view of one
block of samples: a unit writes whole shards, and two writers never touch the
same object (several writers of one shard lose data, FACTS.md).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import zarr

from .codecs import compressor
from .location import Location, answering
from .units import ArraySpec, CommittedUnits, as_location, register_backend

# Epochs read whole shards, so an inner chunk is the whole shard (smallest and
# fastest, benchmarks/store.py) unless its rows are wide: a chunk stays under
# CHUNK_BYTES (a DINOv2-S token row is 257 x 384 float16 = 193 KiB).
CHUNK_BYTES = 4 << 20


def inner_chunk_rows(block: int, row_shape: tuple[int, ...], dtype) -> int:
    """Rows per inner chunk: the largest divisor of the block (chunks must tile a shard) within CHUNK_BYTES."""
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    # The divisors in pairs (d, block // d) up to the square root: a large block costs no long loop.
    small = [d for d in range(1, math.isqrt(block) + 1) if block % d == 0]
    divisors = {*small, *(block // d for d in small)}
    return max(d for d in divisors if d == 1 or d * row_bytes <= CHUNK_BYTES)


@register_backend
class UnitArrays(CommittedUnits):
    """A zarr group of [V, N, ...] arrays, one shard per (view, block) unit."""

    format = "zarr"

    def __init__(self, location, block: int):
        super().__init__(location, block)
        self.group = self.location.open_group("a")
        self._opened: dict[str, zarr.Array] = {}  # opening an array reads its zarr.json: once per group, not per unit

    @classmethod
    def create(cls, location, specs: dict[str, ArraySpec], num_views: int, num_samples: int, block: int):
        location = as_location(location)
        group = location.open_group("a")
        for name, spec in specs.items():
            if name in group:
                continue
            rows = (1, inner_chunk_rows(block, spec.row_shape, spec.dtype))
            group.create_array(
                name,
                shape=(num_views, num_samples, *spec.row_shape),
                dtype=spec.dtype,
                chunks=(*rows, *spec.row_shape),
                shards=(1, block, *spec.row_shape),
                compressors=[compressor(spec.dtype)],
                fill_value=0,
            )
        return cls(location, block)

    def _arrays(self):
        # commits/ and teacher.json live beside the arrays; zarr warns about them when listing.
        with warnings.catch_warnings(), answering(self.location.url):
            warnings.filterwarnings("ignore", message="Object at .* is not recognized")
            return list(self.group.arrays())

    @property
    def names(self) -> list[str]:
        return sorted(name for name, _ in self._arrays())

    def describe(self, units=None) -> dict[str, dict]:
        """Per array: dtype, full shape, decoded bytes and bytes as stored (after compression)."""
        return {
            name: {"dtype": str(arr.dtype), "shape": list(arr.shape), "nbytes": arr.nbytes, "stored_bytes": self._stored(name, arr, units)}
            for name, arr in sorted(self._arrays())
        }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(arr.shape) for name, arr in self._arrays()}

    def _stored(self, name: str, arr: zarr.Array, units) -> int:
        if units is None:
            return arr.nbytes_stored()
        sizes = (self.location / name).file_sizes()  # one listing: shards and the array's zarr.json
        keys = {arr.metadata.encode_chunk_key((v, b) + (0,) * (arr.ndim - 2)) for v, b in units}
        return sum(size for key, size in sizes.items() if key in keys or key == "zarr.json")

    def array(self, name: str) -> zarr.Array:
        if name not in self._opened:
            self._opened[name] = self.group[name]
        return self._opened[name]

    def resize_views(self, num_views: int) -> None:
        """Grow the view axis; existing shards are untouched (view-major layout)."""
        for _, arr in self._arrays():
            if arr.shape[0] < num_views:
                with answering(self.location.url):
                    arr.resize((num_views, *arr.shape[1:]))
        self._opened.clear()

    def _shard(self, view: int, block: int, name: str) -> Location:
        arr = self.array(name)
        return self.location / name / arr.metadata.encode_chunk_key((view, block) + (0,) * (arr.ndim - 2))

    def _has_data(self, view: int, block: int, name: str) -> bool:
        return self._shard(view, block, name).exists()

    def _write_data(self, view, block, data):
        with answering(self.location.url):  # a remote store that stops answering mid-write: one line
            return self._write_rows(view, block, data)

    def _write_rows(self, view, block, data):
        start = block * self.block
        out = {}
        for name, rows_data in data.items():
            arr = self.array(name)
            rows_data = np.asarray(rows_data, dtype=arr.dtype)
            # zarr reads a shard before writing into it; the old bytes of an
            # uncommitted unit mean nothing (and may be torn), so drop them first.
            self._shard(view, block, name).remove()
            # One assignment covering the whole shard: one owner, one write.
            arr[view, start : start + len(rows_data)] = rows_data
            out[name] = rows_data
        return out

    def _read_data(self, view, block, names, start, stop):
        with answering(self.location.url):
            return {name: self.array(name)[view, start:stop] for name in names}
