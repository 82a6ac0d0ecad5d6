"""The teacher cache: view-major arrays written in committed units, at a path or an fsspec URL.

Layout (see DESIGN.md)::

    STORE/store.json                     format, dataset and plan description, N, V, block
    STORE/plan/...                       view parameters and fingerprints, [V, N, ...]
    STORE/teachers/<id>/teacher.json     what produced the arrays below
    STORE/teachers/<id>/...              cached outputs, [V, N, ...]
    STORE/teachers/<id>/commits/         one record per committed (view, block) unit

Every array is view-major and sharded so that one shard holds one view of one
block of samples. That block is the unit of work: it is written whole, by one
writer, and becomes visible only once its commit record exists. A crashed
writer therefore leaves at most an uncommitted shard, which the next run
rewrites. Each record carries checksums of the unit's arrays, so damage after
the commit is found (``check_unit``) and readers can refuse it.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass

import numpy as np
import zarr

from .codecs import compressor
from .errors import UserError
from .location import Location
from .lock import TeacherLock

FORMAT_VERSION = 1
STORE_FILE = "store.json"

# Epochs read whole shards, so an inner chunk is the whole shard (smallest and
# fastest, benchmarks/store.py) unless its rows are wide: a chunk stays under
# CHUNK_BYTES (a DINOv2-S token row is 257 x 384 float16 = 193 KiB).
CHUNK_BYTES = 4 << 20


def inner_chunk_rows(block: int, row_shape: tuple[int, ...], dtype) -> int:
    """Rows per inner chunk: the largest divisor of the block (chunks must tile a shard) within CHUNK_BYTES."""
    row_bytes = int(np.prod(row_shape)) * np.dtype(dtype).itemsize
    return max(d for d in range(1, block + 1) if block % d == 0 and (d == 1 or d * row_bytes <= CHUNK_BYTES))


def checksum(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:32]


def as_location(path) -> Location:
    return path if isinstance(path, Location) else Location(path)


@dataclass(frozen=True)
class ArraySpec:
    """One cached array: its per-row shape (after [V, N]) and dtype."""

    row_shape: tuple[int, ...]
    dtype: str


class DamagedUnit(UserError):
    """A unit that is missing, or whose bytes no longer match its commit record."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(
            f"{problem}: `pipeline verify STORE` lists every damaged unit, and the extract command with --repair rewrites them"
        )


class CommittedUnits:
    """Commit records of (view, block) units under ``LOCATION/commits/``; backends add the data.

    A backend implements ``names``, ``_write_data(view, block, data)`` and
    ``_read_data(view, block, names, start, stop)``; the commit protocol and
    the integrity checks are the same for all of them.
    """

    def __init__(self, location, block: int):
        self.location = as_location(location)
        self.block = block
        self.commits = self.location / "commits"

    names: list[str]

    # -- commits ---------------------------------------------------------------------------
    def _record(self, view: int, block: int) -> Location:
        return self.commits / f"v{view:06d}-b{block:06d}.json"

    def committed(self) -> set[tuple[int, int]]:
        """All committed (view, block) units, from one listing."""
        units = set()
        for name in self.commits.listdir():
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
        return self._record(view, block).exists()

    def uncommit(self, view: int, block: int) -> None:
        """Take a unit back: its record goes, so the next extraction writes it again."""
        self._record(view, block).remove()

    def record(self, view: int, block: int) -> dict:
        loc = self._record(view, block)
        try:
            record = loc.read_json()
        except FileNotFoundError:
            raise DamagedUnit(f"unit (view {view}, block {block}) of {self.location} is not committed") from None
        except ValueError:
            raise DamagedUnit(f"commit record {loc} is unreadable (truncated?)") from None
        if not isinstance(record, dict) or "checksums" not in record:
            raise DamagedUnit(f"commit record {loc} is incomplete")
        return record

    def write_unit(self, view: int, block: int, data: dict[str, np.ndarray]) -> None:
        """Write one (view, block) unit whole, then its commit record.

        ``data`` maps every array of the group to its rows for the block. The
        record is written last: until it exists the unit does not count.
        """
        missing = set(self.names) - set(data)
        if missing:
            raise ValueError(f"unit ({view}, {block}) lacks arrays {sorted(missing)}")
        data = self._write_data(view, block, data)
        rows = len(next(iter(data.values())))
        record = {
            "view": view,
            "block": block,
            "start": block * self.block,
            "rows": rows,
            "checksums": {name: checksum(d) for name, d in data.items()},
        }
        self._record(view, block).write_json(record)

    def read_unit(self, view: int, block: int, names: list[str] | None = None, rows: int | None = None, *, verify: bool = False):
        """Rows of one (view, block) unit: one whole-shard read per array.

        With ``verify`` the rows are checked against the unit's commit record,
        and a unit that is not committed or does not match raises ``DamagedUnit``.
        """
        names = names or self.names
        start = block * self.block
        record = self.record(view, block) if verify else None
        if record is not None:
            rows = record["rows"]
        stop = start + (rows if rows is not None else self.block)
        try:
            out = self._read_data(view, block, names, start, stop)
        except Exception as e:  # a codec or a truncated object fails in its own way
            if not verify:
                raise
            raise DamagedUnit(f"unit (view {view}, block {block}) of {self.location} cannot be read: {type(e).__name__}: {e}") from e
        if record is not None:
            bad = [n for n in names if checksum(out[n]) != record["checksums"].get(n)]
            if bad:
                raise DamagedUnit(f"unit (view {view}, block {block}) of {self.location}: {', '.join(bad)} differ from the commit record")
        return out

    def check_unit(self, view: int, block: int) -> str | None:
        """What is wrong with a committed unit (missing data, bad bytes, bad record), or None."""
        try:
            self.record(view, block)
            missing = [n for n in self.names if not self._has_data(view, block, n)]
            if missing:
                return f"missing shard ({', '.join(missing)})"
            self.read_unit(view, block, verify=True)
        except DamagedUnit as e:
            return e.problem
        return None

    # -- backend ---------------------------------------------------------------------------
    def _write_data(self, view: int, block: int, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _read_data(self, view: int, block: int, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _has_data(self, view: int, block: int, name: str) -> bool:
        raise NotImplementedError


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
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Object at .* is not recognized")
            return list(self.group.arrays())

    @property
    def names(self) -> list[str]:
        return sorted(name for name, _ in self._arrays())

    def describe(self) -> dict[str, dict]:
        """Per array: dtype, full shape, decoded bytes and bytes as stored (after compression)."""
        return {
            name: {"dtype": str(arr.dtype), "shape": list(arr.shape), "nbytes": arr.nbytes, "stored_bytes": arr.nbytes_stored()}
            for name, arr in sorted(self._arrays())
        }

    def array(self, name: str) -> zarr.Array:
        if name not in self._opened:
            self._opened[name] = self.group[name]
        return self._opened[name]

    def resize_views(self, num_views: int) -> None:
        """Grow the view axis; existing shards are untouched (view-major layout)."""
        for _, arr in self._arrays():
            if arr.shape[0] < num_views:
                arr.resize((num_views, *arr.shape[1:]))
        self._opened.clear()

    def _shard(self, view: int, block: int, name: str) -> Location:
        arr = self.array(name)
        return self.location / name / arr.metadata.encode_chunk_key((view, block) + (0,) * (arr.ndim - 2))

    def _has_data(self, view: int, block: int, name: str) -> bool:
        return self._shard(view, block, name).exists()

    def _write_data(self, view, block, data):
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
        return {name: self.array(name)[view, start:stop] for name in names}


class Store:
    """A cache store: ``store.json``, a plan and zero or more teachers, at a path or URL."""

    def __init__(self, path):
        self.path = as_location(path)
        meta_file = self.path / STORE_FILE
        if not _reachable_exists(meta_file):
            raise UserError(f"no store at {self.path} (missing {STORE_FILE}): run `pipeline extract --store {self.path} ...` first")
        try:
            self.meta = meta_file.read_json()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {meta_file}: {e}; the store is damaged, extract it again") from e
        version = self.meta.get("format")
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise UserError(
                f"store {self.path} was written by a newer pipeline (store format {version}; this one reads {FORMAT_VERSION}): "
                "upgrade this pipeline to read it"
            )
        if version != FORMAT_VERSION:
            raise UserError(f"store {self.path} has format {version}, this pipeline reads format {FORMAT_VERSION}: extract a new store")

    # -- creation --------------------------------------------------------------------------
    @classmethod
    def exists(cls, path) -> bool:
        return _reachable_exists(as_location(path) / STORE_FILE)

    @classmethod
    def create(cls, path, *, meta: dict, num_samples: int, num_views: int, block: int, plan_specs: dict[str, ArraySpec]):
        loc = as_location(path)
        if _reachable_exists(loc) and loc.listdir():
            raise UserError(f"{loc} exists and is not a store: choose an empty or new directory for --store")
        loc.makedirs()
        loc.open_group("a")
        UnitArrays.create(loc / "plan", plan_specs, num_views, num_samples, block)
        meta = {**meta, "format": FORMAT_VERSION, "num_samples": num_samples, "num_views": num_views, "block": block}
        # store.json last: a store without it is not a store, so a crash during
        # creation leaves nothing that later looks whole.
        (loc / STORE_FILE).write_json(meta)
        return cls(loc)

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
        (self.path / STORE_FILE).write_json(self.meta)

    # -- groups ----------------------------------------------------------------------------
    @property
    def plan(self) -> UnitArrays:
        return UnitArrays(self.path / "plan", self.block)

    def teacher_ids(self) -> list[str]:
        root = self.path / "teachers"
        return [name for name in root.listdir() if (root / name / "teacher.json").exists()]

    def teacher_info(self, teacher_id: str) -> dict:
        loc = self.path / "teachers" / teacher_id / "teacher.json"
        if not loc.exists():
            known = ", ".join(self.teacher_ids()) or "none"
            raise UserError(f"store {self.path} has no teacher '{teacher_id}' (it has: {known})")
        return loc.read_json()

    def teacher(self, teacher_id: str) -> CommittedUnits:
        info = self.teacher_info(teacher_id)
        return _backend(info.get("format", "zarr"))(self.path / "teachers" / teacher_id, self.block)

    def lock_teacher(self, teacher_id: str) -> TeacherLock:
        """A lock that lets one extraction at a time write ``teacher_id`` (use with ``with``)."""
        return TeacherLock(self.path / "teachers" / teacher_id / "lock.json", f"teacher '{teacher_id}' in {self.path}")

    def create_teacher(self, teacher_id: str, info: dict, specs: dict[str, ArraySpec]) -> CommittedUnits:
        """Create a teacher's arrays, or reopen them; ``info`` (teacher.json) is written either way."""
        root = self.path / "teachers" / teacher_id
        group = _backend(info.get("format", "zarr")).create(root, specs, self.num_views, self.num_samples, self.block)
        (root / "teacher.json").write_json(info)
        return group

    # -- statistics: reductions over a teacher's cache ---------------------------------------
    def write_stats(self, teacher_id: str, arrays: dict[str, np.ndarray], info: dict) -> None:
        """Replace ``stats/<teacher_id>/``: small arrays, written whole, then their description."""
        root = self.path / "stats" / teacher_id
        group = root.open_group("w")
        for name, data in arrays.items():
            group.create_array(name, data=np.ascontiguousarray(data), compressors=[compressor(data.dtype)])
        (root / "stats.json").write_json(info)

    def read_stats(self, teacher_id: str, name: str) -> np.ndarray | None:
        root = self.path / "stats" / teacher_id
        if not (root / "stats.json").exists():
            return None
        return root.open_group("r")[name][:]


def _backend(name: str) -> type[CommittedUnits]:
    if name == "zarr":
        return UnitArrays
    if name == "wds":
        from .wds import TarUnits  # the webdataset backend

        return TarUnits
    raise UserError(f"unknown store format '{name}' (known: zarr, wds): this store was written by a newer pipeline")


def _reachable_exists(loc: Location) -> bool:
    """``loc.exists()``, with an unreachable file system turned into one clear line."""
    try:
        return loc.exists()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except Exception as e:  # network, credentials, DNS: the library's own words say which
        raise UserError(f"cannot reach {loc}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; check the URL, network and credentials") from e
