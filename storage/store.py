"""The teacher cache on disk: a zarr v3 store of view-major arrays with per-unit commits.

Layout (see DESIGN.md)::

    STORE/store.json                     format, dataset and plan description, N, V, block
    STORE/plan/...                       view parameters and fingerprints, [V, N, ...]
    STORE/teachers/<id>/teacher.json     what produced the arrays below
    STORE/teachers/<id>/...              cached outputs, [V, N, ...]

Every array is view-major and sharded so that one shard holds one view of one
block of samples. That block is the unit of work: it is written whole, by one
writer, and becomes visible only once its commit record exists. A crashed
writer therefore leaves at most an uncommitted shard, which the next run
rewrites.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from .errors import UserError

FORMAT_VERSION = 1
STORE_FILE = "store.json"

# Rows per inner chunk: small enough that a partial read stays cheap, large
# enough that whole-shard reads (the epoch pattern) are a handful of chunks.
CHUNK_ROWS = 256


def _compressor(dtype: np.dtype) -> BloscCodec:
    # Bit-shuffle groups the exponent bits of neighbouring floats, which is what
    # makes float16 logits and small integer indices compress (FACTS.md).
    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=np.dtype(dtype).itemsize)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def checksum(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:32]


@dataclass(frozen=True)
class ArraySpec:
    """One cached array: its per-row shape (after [V, N]) and dtype."""

    row_shape: tuple[int, ...]
    dtype: str


class UnitArrays:
    """A zarr group of [V, N, ...] arrays written in committed (view, block) units."""

    def __init__(self, path: Path, block: int):
        self.path = Path(path)
        self.block = block
        self.group = zarr.open_group(str(self.path), mode="a")
        self.commit_dir = self.path / "commits"

    @classmethod
    def create(cls, path: Path, specs: dict[str, ArraySpec], num_views: int, num_samples: int, block: int):
        group = zarr.open_group(str(path), mode="a")
        for name, spec in specs.items():
            if name in group:
                continue
            # Inner chunks must tile the shard exactly.
            rows = (1, CHUNK_ROWS if block % CHUNK_ROWS == 0 else block)
            group.create_array(
                name,
                shape=(num_views, num_samples, *spec.row_shape),
                dtype=spec.dtype,
                chunks=(*rows, *spec.row_shape),
                shards=(1, block, *spec.row_shape),
                compressors=[_compressor(spec.dtype)],
                fill_value=0,
            )
        (Path(path) / "commits").mkdir(parents=True, exist_ok=True)
        return cls(path, block)

    def _arrays(self):
        # commits/ and teacher.json live beside the arrays; zarr warns about them when listing.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Object at .* is not recognized")
            return list(self.group.arrays())

    @property
    def names(self) -> list[str]:
        return sorted(name for name, _ in self._arrays())

    def array(self, name: str) -> zarr.Array:
        return self.group[name]

    def resize_views(self, num_views: int) -> None:
        """Grow the view axis; existing shards are untouched (view-major layout)."""
        for _, arr in self._arrays():
            if arr.shape[0] < num_views:
                arr.resize((num_views, *arr.shape[1:]))

    # -- commits ---------------------------------------------------------------------------
    def _record_path(self, view: int, block: int) -> Path:
        return self.commit_dir / f"v{view:06d}-b{block:06d}.json"

    def committed(self) -> set[tuple[int, int]]:
        """All committed (view, block) units, from one directory listing."""
        units = set()
        if self.commit_dir.exists():
            for name in os.listdir(self.commit_dir):
                m = re.fullmatch(r"v(\d+)-b(\d+)\.json", name)
                if m:
                    units.add((int(m[1]), int(m[2])))
        return units

    def complete_views(self, num_blocks: int) -> int:
        """How many leading views have every block committed."""
        done, views = self.committed(), 0
        while all((views, b) in done for b in range(num_blocks)) and num_blocks:
            views += 1
        return views

    def is_committed(self, view: int, block: int) -> bool:
        return self._record_path(view, block).exists()

    def write_unit(self, view: int, block: int, data: dict[str, np.ndarray]) -> None:
        """Write one (view, block) unit whole, then its commit record.

        ``data`` maps every array of the group to its rows for the block. The
        record is written last: until it exists the unit does not count.
        """
        missing = set(self.names) - set(data)
        if missing:
            raise ValueError(f"unit ({view}, {block}) lacks arrays {sorted(missing)}")
        start = block * self.block
        rows = None
        for name, rows_data in data.items():
            arr = self.group[name]
            rows_data = np.asarray(rows_data, dtype=arr.dtype)
            rows = rows_data.shape[0]
            # zarr reads a shard before writing into it; the old bytes of an
            # uncommitted unit mean nothing (and may be torn), so drop them first.
            key = arr.metadata.encode_chunk_key((view, block) + (0,) * (arr.ndim - 2))
            (self.path / name / key).unlink(missing_ok=True)
            # One assignment covering the whole shard: one owner, one write.
            arr[view, start : start + rows] = rows_data
        record = {
            "view": view,
            "block": block,
            "start": start,
            "rows": rows,
            "checksums": {name: checksum(np.asarray(d, dtype=self.group[name].dtype)) for name, d in data.items()},
        }
        write_json_atomic(self._record_path(view, block), record)

    def read_unit(self, view: int, block: int, names: list[str] | None = None, rows: int | None = None):
        """Rows of one (view, block) unit: a whole-shard read per array."""
        start = block * self.block
        stop = start + (rows if rows is not None else self.block)
        return {name: self.group[name][view, start:stop] for name in (names or self.names)}


class Store:
    """A cache store directory: ``store.json``, a plan and zero or more teachers."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / STORE_FILE
        if not meta_path.exists():
            raise UserError(f"no store at {self.path} (missing {STORE_FILE}): run `pipeline extract --store {self.path} ...` first")
        try:
            self.meta = read_json(meta_path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {meta_path}: {e}; the store is damaged, extract it again") from e
        version = self.meta.get("format")
        if version != FORMAT_VERSION:
            raise UserError(
                f"store {self.path} has format {version}, this pipeline reads format {FORMAT_VERSION}: "
                "use the pipeline version that wrote it, or extract a new store"
            )

    # -- creation --------------------------------------------------------------------------
    @classmethod
    def exists(cls, path) -> bool:
        return (Path(path) / STORE_FILE).exists()

    @classmethod
    def create(cls, path, *, meta: dict, num_samples: int, num_views: int, block: int, plan_specs: dict[str, ArraySpec]):
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            raise UserError(f"{path} exists and is not a store: choose an empty or new directory for --store")
        path.mkdir(parents=True, exist_ok=True)
        zarr.open_group(str(path), mode="a")
        UnitArrays.create(path / "plan", plan_specs, num_views, num_samples, block)
        meta = {**meta, "format": FORMAT_VERSION, "num_samples": num_samples, "num_views": num_views, "block": block}
        # store.json last: a store without it is not a store, so a crash during
        # creation leaves nothing that later looks whole.
        write_json_atomic(path / STORE_FILE, meta)
        return cls(path)

    # -- shape -----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.meta["num_samples"]

    @property
    def num_views(self) -> int:
        return self.meta["num_views"]

    @property
    def block(self) -> int:
        return self.meta["block"]

    @property
    def num_blocks(self) -> int:
        return -(-self.num_samples // self.block)

    def block_range(self, block: int) -> range:
        return range(block * self.block, min((block + 1) * self.block, self.num_samples))

    def add_views(self, num_views: int) -> None:
        """Extend the view axis of the plan and every teacher to ``num_views``."""
        if num_views <= self.num_views:
            return
        self.plan.resize_views(num_views)
        for tid in self.teacher_ids():
            self.teacher(tid).resize_views(num_views)
        self.meta["num_views"] = num_views
        write_json_atomic(self.path / STORE_FILE, self.meta)

    # -- groups ----------------------------------------------------------------------------
    @property
    def plan(self) -> UnitArrays:
        return UnitArrays(self.path / "plan", self.block)

    def teacher_ids(self) -> list[str]:
        root = self.path / "teachers"
        if not root.exists():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "teacher.json").exists())

    def teacher_info(self, teacher_id: str) -> dict:
        path = self.path / "teachers" / teacher_id / "teacher.json"
        if not path.exists():
            known = ", ".join(self.teacher_ids()) or "none"
            raise UserError(f"store {self.path} has no teacher '{teacher_id}' (it has: {known})")
        return read_json(path)

    def teacher(self, teacher_id: str) -> UnitArrays:
        self.teacher_info(teacher_id)
        return UnitArrays(self.path / "teachers" / teacher_id, self.block)

    # -- statistics: reductions over a teacher's cache ---------------------------------------
    def write_stats(self, teacher_id: str, arrays: dict[str, np.ndarray], info: dict) -> None:
        """Replace ``stats/<teacher_id>/``: small arrays, written whole, then their description."""
        root = self.path / "stats" / teacher_id
        group = zarr.open_group(str(root), mode="w")
        for name, data in arrays.items():
            group.create_array(name, data=np.ascontiguousarray(data), compressors=[_compressor(data.dtype)])
        write_json_atomic(root / "stats.json", info)

    def read_stats(self, teacher_id: str, name: str) -> np.ndarray | None:
        root = self.path / "stats" / teacher_id
        if not (root / "stats.json").exists():
            return None
        return zarr.open_group(str(root), mode="r")[name][:]

    def create_teacher(self, teacher_id: str, info: dict, specs: dict[str, ArraySpec]) -> UnitArrays:
        """Create a teacher's arrays, or reopen them; ``info`` (teacher.json) is written either way."""
        root = self.path / "teachers" / teacher_id
        group = UnitArrays.create(root, specs, self.num_views, self.num_samples, self.block)
        write_json_atomic(root / "teacher.json", info)
        return group
