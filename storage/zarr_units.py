"""The zarr backend: a group of [V, N, ...] zarr v3 arrays, one shard per (view, block) unit.

Every array is view-major and sharded so that one shard holds one view of one
block of samples: a unit writes whole shards, and two writers never touch the
same object (several writers of one shard lose data, FACTS.md).
"""

from __future__ import annotations

import math
import struct
import warnings
from dataclasses import dataclass

import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.bytes import Endian
from zarr.codecs.sharding import ShardingCodecIndexLocation

from .codecs import compressor
from .file_systems import answering
from .local_files import check_regular
from .location import Location
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


# An inner chunk the shard does not hold (all fill value): both its offset and length are this (zarr's MAX_UINT_64).
NO_CHUNK = 2**64 - 1
BLOSC_HEADER = 16  # version, flags, typesize, then uint32 decoded bytes, block size, compressed bytes


@dataclass(frozen=True)
class ShardLayout:
    """How one shard of an array is laid out, for decoding its bytes without zarr's per-read machinery.

    zarr's read of a small shard costs about 1 ms of event-loop round trips and
    per-chunk bookkeeping (benchmarks/store.py, read section), several times the
    decompression itself. A shard written by ``UnitArrays.create`` is the
    sharding codec's standard layout: inner chunks of ``chunk_rows`` rows,
    each little-endian bytes compressed by blosc, then an index of (offset,
    length) pairs with its CRC32C at the end. ``of`` recognises exactly that
    layout; any other array is read by zarr.
    """

    dtype: np.dtype
    row_shape: tuple[int, ...]
    shard_rows: int
    chunk_rows: int
    fill_value: object

    @classmethod
    def of(cls, arr: zarr.Array) -> ShardLayout | None:
        """The layout of ``arr`` when it is the one this module writes, else None."""
        codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding, dtype = codecs[0], np.dtype(arr.dtype)
        inner = tuple(sharding.codecs)
        plain = (
            dtype.kind in "biuf"
            and len(inner) == 2
            and isinstance(inner[0], BytesCodec)
            and (inner[0].endian == Endian.little or dtype.itemsize == 1)  # one-byte values have no byte order
            and isinstance(inner[1], BloscCodec)
            and sharding.index_location == ShardingCodecIndexLocation.end
            and tuple(sharding.index_codecs) == (BytesCodec(endian=Endian.little), Crc32cCodec())
        )
        shard, chunk = tuple(arr.metadata.chunk_grid.chunk_shape), tuple(sharding.chunk_shape)
        if not plain or shard[0] != 1 or chunk[0] != 1 or shard[2:] != chunk[2:] or shard[1] % chunk[1]:
            return None
        return cls(dtype.newbyteorder("<"), shard[2:], shard[1], chunk[1], arr.fill_value)

    def decode(self, data: bytes, rows: int) -> np.ndarray:
        """The first ``rows`` rows of a shard from its bytes, as zarr would read them (bit for bit)."""
        if not 0 <= rows <= self.shard_rows:
            raise ValueError(f"{rows} rows asked of a shard of {self.shard_rows}")
        index = self._index(data)
        chunks = -(-rows // self.chunk_rows)  # only the chunks that hold wanted rows
        out = np.empty((chunks * self.chunk_rows, *self.row_shape), self.dtype)
        source = memoryview(data)
        for i in range(chunks):
            part = out[i * self.chunk_rows : (i + 1) * self.chunk_rows]
            offset, length = (int(x) for x in index[i])
            if offset == NO_CHUNK and length == NO_CHUNK:
                part[...] = self.fill_value  # zarr leaves an all-fill chunk unwritten
                continue
            chunk = source[offset : offset + length]
            # c-blosc trusts its header: it fills a larger buffer without a word and reads as far as the header
            # says, so the header must promise exactly this chunk's decoded bytes and the length the index gives.
            if (
                length < BLOSC_HEADER
                or offset + length > len(data)
                or struct.unpack_from("<III", chunk, 4)[::2] != (part.nbytes, length)
            ):
                raise ValueError(f"inner chunk {i} of the shard is not a blosc buffer of {part.nbytes} bytes")
            numcodecs.blosc.decompress(chunk, part)
        return out[:rows]

    def _index(self, data: bytes) -> np.ndarray:
        """(chunks, 2) offsets and lengths, after checking the index's CRC32C as zarr does."""
        chunks = self.shard_rows // self.chunk_rows
        size = 16 * chunks
        if len(data) < size + 4:
            raise ValueError(f"shard of {len(data)} bytes is shorter than its index")
        index = data[-size - 4 : -4]
        if np.uint32(google_crc32c.value(index)).tobytes() != data[-4:]:
            raise ValueError("the shard index's CRC32C does not match")
        return np.frombuffer(index, "<u8").reshape(chunks, 2)


@register_backend
class UnitArrays(CommittedUnits):
    """A zarr group of [V, N, ...] arrays, one shard per (view, block) unit."""

    format = "zarr"

    def __init__(self, location, block: int):
        super().__init__(location, block)
        self.group = self.location.open_group("a")
        self._opened: dict[str, zarr.Array] = {}  # opening an array reads its zarr.json: once per group, not per unit
        self._layouts: dict[str, ShardLayout | None] = {}

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
            name: {
                "dtype": str(arr.dtype),
                "shape": list(arr.shape),
                "nbytes": arr.nbytes,
                "stored_bytes": self._stored(name, arr, units),
            }
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
        self._layouts.clear()

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
            return {name: self._read_rows(view, block, name, start, stop) for name in names}

    def _read_rows(self, view, block, name, start, stop):
        """One array's rows of a unit: the shard's bytes fetched once and decoded directly where the layout allows."""
        if name not in self._layouts:
            self._layouts[name] = ShardLayout.of(self.array(name))
        layout = self._layouts[name]
        data = self._shard_bytes(view, block, name) if layout and layout.shard_rows == self.block else None
        if data is None:  # another layout, or no shard (zarr reads the fill value): zarr's own read
            return self.array(name)[view, start:stop]
        return layout.decode(data, stop - start)

    def _shard_bytes(self, view, block, name) -> bytes | None:
        """The whole shard object, or None where there is none (as zarr's store sees it: a directory counts as none)."""
        loc = self._shard(view, block, name)
        try:
            if not self.location.is_local:
                return loc.fs.cat_file(loc.path)
            check_regular(loc.path)  # a pipe would block the read forever
            with open(loc.path, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
