"""The teacher cache: a store.json, a view plan and zero or more teachers, at a path or an fsspec URL.

Layout (the manual's page on the store, docs/store.md, describes each array)::

    STORE/store.json                     format, dataset and plan description, N, V, block, order
    STORE/order                          [N] int64: the sample id at each row position of every [V, N] array
    STORE/plan/...                       view parameters and fingerprints, [V, N, ...]
    STORE/teachers/<id>/teacher.json     what produced the arrays below (``TeacherRecord``)
    STORE/teachers/<id>/...              cached outputs, [V, N, ...]
    STORE/teachers/<id>/commits/         one record per committed (view, block) unit

Every group (the plan, each teacher) is written in committed (view, block)
units (``storage.units``). Rows are laid out in the store's ``order``, fixed
when it is created: block b is rows ``b * block .. (b + 1) * block - 1``, which
hold samples ``order[b * block : (b + 1) * block]``. The caller chooses the
order (``stages.cache.store_setup``: a seeded permutation, so that every block is a
random sample of a class-ordered dataset); the store records it and checks it. The plan is always a zarr group; a teacher's
arrays use the backend named by its teacher.json ``format``, looked up in the
backend registry (``storage.zarr_units``, ``storage.wds``).
"""

from __future__ import annotations

import numpy as np

from .codecs import compressor
from .errors import UserError
from .file_systems import answering
from .location import Location
from .lock import WriterLock
from .names import check_name
from .store_record import FORMAT_VERSION, DatasetRecord, OrderRecord, PlanRecord, StoreRecord, check_format, check_sizes
from .teacher_record import TeacherRecord
from .units import ArraySpec, CommittedUnits, as_location, backend, checksum
from .zarr_units import UnitArrays

STORE_FILE = "store.json"
ORDER_ARRAY = "order"

__all__ = ["Store", "FORMAT_VERSION"]


class Store:
    """A cache store: ``store.json``, a plan and zero or more teachers, at a path or URL.

    Opening a store reads and checks ``store.json`` (its format, its fields, and its sizes against the arrays they
    describe); ``Store.create`` makes a new one. Stage one writes teachers into it, stage two reads them.

    Args:
        path: the store: a local directory or an fsspec URL (``s3://bucket/caches/in1k``).

    Raises:
        UserError: no store at ``path``, a store of an older format, or a damaged ``store.json``.

    Example:
        >>> store = Store("runs/digits")
        >>> store.num_samples, store.num_views, store.teacher_ids()
        (1433, 8, ['resnet18'])
    """

    def __init__(self, path):
        self.path = as_location(path)
        record_file = self.path / STORE_FILE
        if not record_file.reach():
            raise UserError(
                f"no store at {self.path} (missing {STORE_FILE}): run `pipeline extract --store {self.path} ...` first"
            )
        try:
            data = record_file.read_json()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {record_file}: {e}; the store is damaged, extract it again") from e
        check_format(self.path, data.get("format") if isinstance(data, dict) else None)
        try:
            self.record = StoreRecord.from_dict(data)
            self._check_arrays()
        except ValueError as e:
            raise UserError(f"cannot read {record_file}: {e}; the store is damaged, extract it again") from e
        self._order: np.ndarray | None = None

    def _check_arrays(self) -> None:
        """store.json's N, V and block against the arrays they describe (the order, the plan's fingerprints), before
        they size anything; a missing array is left to its reader, which names it."""
        try:
            root = self.path.open_group("r")
            order, plan = root[ORDER_ARRAY], root["plan"]["fingerprint"]
        except (KeyError, FileNotFoundError, OSError):
            return
        check_sizes(self.record, ORDER_ARRAY, order.shape, plan.shape, plan.shards)

    # -- creation --------------------------------------------------------------------------
    @classmethod
    def exists(cls, path) -> bool:
        """Whether a finished store is at ``path`` (its ``store.json`` exists).

        Args:
            path: a local directory or an fsspec URL.

        Returns:
            True when ``path`` holds a store (a location that cannot be reached raises ``UserError``).
        """
        return (as_location(path) / STORE_FILE).reach()

    @classmethod
    def create(
        cls,
        path,
        *,
        dataset: DatasetRecord,
        plan: PlanRecord,
        versions: dict,
        num_views: int,
        block: int,
        plan_specs: dict[str, ArraySpec],
        order: np.ndarray | None = None,
        order_seed: int | None = None,
    ):
        """Make a store of ``dataset``'s samples; a creation that was stopped before store.json (a kill, a crash) is made again from the start.

        Args:
            path: where the store goes: a new or empty directory, or an fsspec URL.
            dataset: the data's description and fingerprint (``DatasetRecord``), which every later stage checks.
            plan: the view plan's description (recipe, seed, size) as recorded in ``store.json``.
            versions: the library versions the views were rendered with, recorded for the reader.
            num_views: the views per sample the plan arrays are sized for (more may be added later).
            block: the samples per block, the rows of one (view, block) unit.
            plan_specs: the plan's arrays by name (dtype and row shape of each).
            order: the sample id at each row position, a permutation of 0..N-1 (default: the ids in order).
            order_seed: the seed ``order`` was permuted with (None: it is the source's own order).

        Returns:
            The new ``Store``, opened.

        Raises:
            UserError: a count below 1, or ``path`` holding something that is not a store.
        """
        num_samples = dataset.num_samples
        for name, value in (("samples", num_samples), ("views", num_views), ("block", block)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"a store needs at least 1 {name}, not {value}")
        loc = as_location(path)
        if loc.reach() and loc.listdir():  # an unreachable bucket is one clear line
            if not _unfinished_creation(loc):
                raise UserError(f"{loc} exists and is not a store: choose an empty or new directory for --store")
            for name in CREATION_FILES:  # nothing was ever committed without store.json: start over
                (loc / name).remove_tree()
        order = np.arange(num_samples, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
        if order.shape != (num_samples,) or not np.array_equal(np.sort(order), np.arange(num_samples)):
            raise UserError(f"a store's order must be a permutation of its {num_samples} sample ids")
        kind = "source" if order_seed is None else "permuted"
        record = StoreRecord(
            format=FORMAT_VERSION,
            num_samples=num_samples,
            num_views=num_views,
            block=block,
            dataset=dataset,
            plan=plan,
            order=OrderRecord(kind=kind, checksum=checksum(order), seed=order_seed),
            versions=versions,
        )
        record.check()
        loc.makedirs()
        root = loc.open_group("a")
        root.create_array(ORDER_ARRAY, data=order, compressors=[compressor(order.dtype)], overwrite=True)
        UnitArrays.create(loc / "plan", plan_specs, num_views, num_samples, block)
        # store.json last: a store without it is not a store, so a crash during
        # creation leaves nothing that later looks whole.
        (loc / STORE_FILE).write_json(record.to_dict())
        return cls(loc)

    # -- shape -----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """N, the samples the store holds rows for."""
        return self.record.num_samples

    @property
    def num_views(self) -> int:
        """V, the views per sample the plan holds (a teacher may have committed fewer)."""
        return self.record.num_views

    @property
    def block(self) -> int:
        """B, the samples per block: the rows of one (view, block) unit."""
        return self.record.block

    @property
    def num_blocks(self) -> int:
        """The blocks of N samples, the last one possibly short."""
        return -(-self.num_samples // self.block)

    def block_range(self, block: int) -> range:
        """The row positions of ``block`` in every [V, N] array (its samples are ``block_ids``).

        Args:
            block: the block's index, 0 .. num_blocks - 1.

        Returns:
            The range of its row positions.
        """
        return range(block * self.block, min((block + 1) * self.block, self.num_samples))

    @property
    def order(self) -> np.ndarray:
        """(N,) int64: the sample id at each row position, as recorded at creation (read once, checked)."""
        if self._order is None:
            loc = self.path / ORDER_ARRAY
            try:
                with answering(self.path.url):  # silence is not damage: say the server stopped answering
                    order = np.asarray(self.path.open_group("r")[ORDER_ARRAY][:], dtype=np.int64)
            except (KeyError, FileNotFoundError, ValueError, OSError) as e:
                raise UserError(
                    f"store {self.path} has no readable sample order ({loc}: {type(e).__name__}); the store is damaged, extract it again"
                ) from e
            if order.shape != (self.num_samples,) or checksum(order) != self.record.order.checksum:
                raise UserError(
                    f"{loc} does not match its checksum in {STORE_FILE}: the store is damaged, extract it again"
                )
            self._order = order
        return self._order

    def block_ids(self, block: int) -> np.ndarray:
        """The sample ids of ``block``, at its row positions: ``order[block * B : (block + 1) * B]``.

        Args:
            block: the block's index, 0 .. num_blocks - 1.

        Returns:
            (rows,) int64 sample ids.
        """
        return self.order[block * self.block : (block + 1) * self.block]

    def positions(self, ids) -> np.ndarray:
        """The row position of each sample id in ``ids`` (the inverse of ``order``).

        Args:
            ids: sample ids, any integer array-like.

        Returns:
            int64 row positions, in the shape of ``ids``.
        """
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise UserError(f"store {self.path} has sample ids 0..{self.num_samples - 1}, not {ids.min()}..{ids.max()}")
        inverse = np.empty(self.num_samples, np.int64)
        inverse[self.order] = np.arange(self.num_samples)
        return inverse[ids]

    def units(self, num_views: int) -> list[tuple[int, int]]:
        """Every (view, block) unit of the first ``num_views`` views, view-major.

        Args:
            num_views: how many views, from view 0.

        Returns:
            (view, block) pairs.
        """
        return [(v, b) for v in range(num_views) for b in range(self.num_blocks)]

    def add_views(self, num_views: int) -> None:
        """Extend the view axis of the plan and every teacher to ``num_views`` (no change when it is not more).

        Args:
            num_views: the new view count.
        """
        if num_views <= self.num_views:
            return
        self.plan.resize_views(num_views)
        for tid in self.teacher_ids():
            self.teacher(tid).resize_views(num_views)
        self.record = self.record.replace(num_views=num_views)
        (self.path / STORE_FILE).write_json(self.record.to_dict())

    # -- groups ----------------------------------------------------------------------------
    @property
    def plan(self) -> UnitArrays:
        """The plan's arrays (recorded view parameters and fingerprints), in committed units."""
        return UnitArrays(self.path / "plan", self.block)

    def teacher_ids(self) -> list[str]:
        """The ids of the teachers in the store (those with a ``teacher.json``)."""
        root = self.path / "teachers"
        return [name for name in root.listdir() if (root / name / "teacher.json").exists()]

    def teacher_info(self, teacher_id: str) -> TeacherRecord:
        """teacher.json of ``teacher_id``, checked against the teacher's arrays.

        Args:
            teacher_id: a teacher id of the store.

        Returns:
            The ``TeacherRecord``: model, weights, outputs, dtypes, k, views, format.

        Raises:
            UserError: an unknown id (naming the known ones), or a damaged record.
        """
        root = self.path / "teachers" / _plain(teacher_id)
        loc = root / "teacher.json"
        if not loc.exists():
            known = ", ".join(self.teacher_ids()) or "none"
            raise UserError(f"store {self.path} has no teacher '{teacher_id}' (it has: {known})")
        try:
            record = TeacherRecord.from_dict(loc.read_json())
            # Its sizes (classes, k, feature width, views) against its arrays, before they size a buffer.
            record.check_arrays(backend(record.format)(root, self.block).shapes(), self.num_samples)
            return record
        except ValueError as e:  # unreadable JSON, fields missing, out of bounds, or contradicting the arrays
            raise UserError(
                f"cannot read {loc}: {e}; the teacher's record is damaged, extract it again into a new --teacher-id"
            ) from e

    def teacher(self, teacher_id: str) -> CommittedUnits:
        """A teacher's cached arrays, read and written in committed units.

        Args:
            teacher_id: a teacher id of the store.

        Returns:
            The teacher's ``CommittedUnits``, of the backend its ``teacher.json`` names (zarr or wds).
        """
        return backend(self.teacher_info(teacher_id).format)(self.path / "teachers" / teacher_id, self.block)

    def lock_teacher(self, teacher_id: str) -> WriterLock:
        """A lock that lets one extraction at a time write ``teacher_id`` (use with ``with``).

        Args:
            teacher_id: the teacher about to be written.

        Returns:
            A ``WriterLock`` on ``teachers/<id>/lock.json``.
        """
        return WriterLock(
            self.path / "teachers" / _plain(teacher_id) / "lock.json",
            f"teacher '{teacher_id}' in {self.path}",
            tidy=self.path,
        )

    def create_teacher(self, teacher_id: str, info: TeacherRecord, specs: dict[str, ArraySpec]) -> CommittedUnits:
        """Create a teacher's arrays, or reopen them; ``info`` (teacher.json, with its ``views``) is written either way.

        Args:
            teacher_id: the new teacher's id (a plain name: letters, digits, ``_``, ``-``, ``.``).
            info: its ``teacher.json`` record; ``info.views`` must be set.
            specs: its arrays by name (dtype and row shape of each).

        Returns:
            The teacher's ``CommittedUnits``.
        """
        if info.views is None:
            raise UserError("a teacher's record needs its view count (views) before its arrays are created")
        root = self.path / "teachers" / _plain(teacher_id)
        group = backend(info.format).create(root, specs, self.num_views, self.num_samples, self.block)
        (root / "teacher.json").write_json(info.to_dict())
        return group

    # -- statistics: reductions over a teacher's cache ---------------------------------------
    def write_stats(self, teacher_id: str, arrays: dict[str, np.ndarray], info: dict) -> None:
        """Replace ``stats/<teacher_id>/``: small arrays, written whole, then their description.

        Args:
            teacher_id: the teacher the statistics reduce.
            arrays: the arrays by name (class means, feature mean, covariance).
            info: their description, written as ``stats.json`` last.
        """
        root = self.path / "stats" / _plain(teacher_id)
        group = root.open_group("w")
        for name, data in arrays.items():
            group.create_array(name, data=np.ascontiguousarray(data), compressors=[compressor(data.dtype)])
        (root / "stats.json").write_json(info)

    def read_stats(self, teacher_id: str, name: str) -> np.ndarray | None:
        """One array of ``stats/<teacher_id>/``.

        Args:
            teacher_id: the teacher the statistics reduce.
            name: the array's name (``class_means``, say).

        Returns:
            The array, or None when no statistics were written for the teacher (``pipeline stats``).
        """
        root = self.path / "stats" / _plain(teacher_id)
        if not (root / "stats.json").exists():
            return None
        return root.open_group("r")[name][:]


# What ``Store.create`` writes before store.json: a directory holding only these (and no committed unit)
# is a creation that was stopped, not somebody else's data.
CREATION_FILES = ("zarr.json", ORDER_ARRAY, "plan")


def _unfinished_creation(loc: Location) -> bool:
    if (loc / STORE_FILE).exists() or not set(loc.listdir()) <= set(CREATION_FILES):
        return False
    return not (loc / "plan" / "commits").listdir()


def _plain(teacher_id: str) -> str:
    """A teacher id is one plain name: ``teachers/<id>`` and ``stats/<id>`` stay inside the store."""
    return check_name(teacher_id, "teacher id")
