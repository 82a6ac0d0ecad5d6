"""Committed units: the protocol every store backend shares, and the registry the store picks a backend from.

A group of [V, N, ...] arrays (the plan, or one teacher) is written in units
of one view of one block of samples. A unit is written whole, by one writer,
and becomes visible only once its commit record
``LOCATION/commits/vVVVVVV-bBBBBBB.json`` exists. A crashed writer therefore
leaves at most an uncommitted unit, which the next run rewrites. Each record
carries checksums of the unit's arrays, so damage after the commit is found
(``check_unit``) and readers can refuse it.

``CommittedUnits`` implements that protocol once and declares what a backend
adds (how a unit's rows are laid out on storage); a backend registers itself
with ``register_backend`` under its ``format`` (the ``format`` of
teacher.json), and ``backend(name)`` finds it again.
"""

from __future__ import annotations

import hashlib
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .errors import UserError
from .location import Location
from .registry import Registry


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


class CommittedUnits(ABC):
    """Commit records of (view, block) units under ``LOCATION/commits/``; a backend adds the data.

    The commit protocol and the integrity checks are the same for every
    backend; a backend sets ``format`` and implements the abstract methods
    below: how its arrays are created, listed, described, grown along the view
    axis, and how one unit's rows are written, read and found.
    """

    format: ClassVar[str]  # the backend's name in teacher.json and the registry

    def __init__(self, location, block: int):
        self.location = as_location(location)
        self.block = block
        self.commits = self.location / "commits"

    # -- what a backend implements ---------------------------------------------------------
    @classmethod
    @abstractmethod
    def create(
        cls, location, specs: dict[str, ArraySpec], num_views: int, num_samples: int, block: int
    ) -> CommittedUnits:
        """Create the arrays of ``specs`` (arrays that exist are kept as they are) and open the group."""

    @property
    @abstractmethod
    def names(self) -> list[str]:
        """The group's array names, sorted."""

    @abstractmethod
    def describe(self, units: set[tuple[int, int]] | None = None) -> dict[str, dict]:
        """Per array: ``dtype``, full ``shape``, decoded ``nbytes`` and ``stored_bytes`` (after compression);
        ``units``: count only the stored bytes of these (view, block) units (the committed ones), not a killed
        writer's leftovers."""

    @abstractmethod
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per array: its full [V, N, ...] shape, from metadata alone (no unit is read)."""

    @abstractmethod
    def resize_views(self, num_views: int) -> None:
        """Grow the view axis to ``num_views``; existing units are untouched."""

    @abstractmethod
    def _write_data(self, view: int, block: int, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Write one unit's rows whole (no commit); returns the rows as stored (in the arrays' dtypes)."""

    @abstractmethod
    def _read_data(self, view: int, block: int, names: list[str], start: int, stop: int) -> dict[str, np.ndarray]:
        """Rows ``start .. stop`` of arrays ``names`` of one unit, committed or not."""

    @abstractmethod
    def _has_data(self, view: int, block: int, name: str) -> bool:
        """Whether the stored object holding array ``name`` of the unit exists."""

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
            self._refuse_gone()  # not one missing record: the whole store went away under this command
            raise DamagedUnit(f"unit (view {view}, block {block}) of {self.location} is not committed") from None
        except ValueError:
            raise DamagedUnit(f"commit record {loc} is unreadable (truncated?)") from None
        if not isinstance(record, dict) or "checksums" not in record:
            raise DamagedUnit(f"commit record {loc} is incomplete")
        wrong = self._wrong_field(record, view, block)
        if wrong:
            raise DamagedUnit(f"commit record {loc}: {wrong}")
        return record

    def _wrong_field(self, record: dict, view: int, block: int) -> str | None:
        """What in a commit record is not what ``write_unit`` wrote for (view, block), or None."""
        expected = {"view": view, "block": block, "start": block * self.block}
        for key, value in expected.items():
            if record.get(key) != value or isinstance(record.get(key), bool):
                return f"field '{key}' is {record.get(key)!r}, not {value}"
        rows = record.get("rows")
        if not isinstance(rows, int) or isinstance(rows, bool) or not 0 < rows <= self.block:
            return f"field 'rows' must be a whole number in [1, {self.block}], not {rows!r}"
        sums = record["checksums"]
        if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
            return f"field 'checksums' must map each array to its checksum string, not {sums!r:.60}"
        return None

    def _refuse_gone(self) -> None:
        """One line when this group's folder no longer exists (a store deleted or moved while a command reads it)."""
        gone = not os.path.isdir(self.location.path) if self.location.is_local else not self.location.exists()
        if gone:
            raise UserError(
                f"{self.location} no longer exists: the store was deleted or moved while this command read it; "
                "put it back (or extract it again), then run the same command again"
            )

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

    def read_unit(
        self, view: int, block: int, names: list[str] | None = None, rows: int | None = None, *, verify: bool = False
    ):
        """Rows of one (view, block) unit: one whole-shard read per array.

        With ``verify`` the rows are checked against the unit's commit record,
        and a unit that is not committed or does not match raises ``DamagedUnit``.
        """
        names = names or self.names
        start = block * self.block
        record = self.record(view, block) if verify else None
        if record is None and self.location.is_local:
            self._refuse_gone()  # zarr reads a missing shard as zeros: a deleted store would train on them
        if record is not None:
            rows = record["rows"]
        stop = start + (rows if rows is not None else self.block)
        try:
            out = self._read_data(view, block, names, start, stop)
        except Exception as e:  # a codec or a truncated object fails in its own way
            if not verify:
                raise
            self._refuse_gone()
            raise DamagedUnit(
                f"unit (view {view}, block {block}) of {self.location} cannot be read: {type(e).__name__}: {e}"
            ) from e
        if record is not None:
            bad = [n for n in names if checksum(out[n]) != record["checksums"].get(n)]
            if bad:
                self._refuse_gone()
                raise DamagedUnit(
                    f"unit (view {view}, block {block}) of {self.location}: {', '.join(bad)} differ from the commit record"
                )
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


# -- the registry of backends -------------------------------------------------------------------

_BACKENDS: Registry = Registry("store backend")


def register_backend(cls: type[CommittedUnits]) -> type[CommittedUnits]:
    """Class decorator: make ``cls`` the backend for stores whose teacher.json says ``format: cls.format``."""
    return _BACKENDS.add(cls.format, cls)


def list_backends() -> list[str]:
    """The registered backend names, in registration order."""
    return list(_BACKENDS)


def backend(name: str) -> type[CommittedUnits]:
    """The backend registered as ``name``; a miss names the known ones."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise UserError(
            f"unknown store format '{name}' (known: {', '.join(list_backends())}): this store was written by a newer pipeline"
        ) from None
