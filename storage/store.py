"""The teacher cache: a store.json, a view plan and zero or more teachers, at a path or an fsspec URL.

Layout (see DESIGN.md)::

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
from .location import Location, answering
from .lock import WriterLock
from .names import check_name
from .store_record import DatasetRecord, OrderRecord, PlanRecord, StoreRecord
from .teacher_record import TeacherRecord
from .units import ArraySpec, CommittedUnits, as_location, backend, checksum
from .zarr_units import UnitArrays

# 2: rows in a recorded order of the sample ids (before: block b was ids b*B..), top-k rows with exact tail mass.
FORMAT_VERSION = 2
STORE_FILE = "store.json"
ORDER_ARRAY = "order"


class Store:
    """A cache store: ``store.json``, a plan and zero or more teachers, at a path or URL."""

    def __init__(self, path):
        self.path = as_location(path)
        record_file = self.path / STORE_FILE
        if not _reachable_exists(record_file):
            raise UserError(
                f"no store at {self.path} (missing {STORE_FILE}): run `pipeline extract --store {self.path} ...` first"
            )
        try:
            data = record_file.read_json()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {record_file}: {e}; the store is damaged, extract it again") from e
        _check_format(self.path, data.get("format") if isinstance(data, dict) else None)
        try:
            self.record = StoreRecord.from_dict(data)
            self._check_arrays()
        except ValueError as e:
            raise UserError(f"cannot read {record_file}: {e}; the store is damaged, extract it again") from e
        self._order: np.ndarray | None = None

    def _check_arrays(self) -> None:
        """store.json's N, V and block against the arrays they describe (the order, the plan's fingerprints), before
        they size anything; a missing array is left to its reader, which names it."""
        N, V, B = self.record.num_samples, self.record.num_views, self.record.block
        try:
            root = self.path.open_group("r")
            order, plan = root[ORDER_ARRAY], root["plan"]["fingerprint"]
        except (KeyError, FileNotFoundError, OSError):
            return
        if tuple(order.shape) != (N,):
            raise ValueError(f"field 'num_samples' is {N}, but the {ORDER_ARRAY} array has {order.shape[0]} rows")
        if plan.shape[1] != N:
            raise ValueError(f"field 'num_samples' is {N}, but the plan's arrays have {plan.shape[1]} rows")
        if V > plan.shape[0]:  # the plan grows first when views are added: it may hold more views, never fewer
            raise ValueError(f"field 'num_views' is {V}, but the plan's arrays hold {plan.shape[0]} views")
        if plan.shards is not None and plan.shards[1] != B:
            raise ValueError(f"field 'block' is {B}, but the plan's shards hold {plan.shards[1]} samples")

    # -- creation --------------------------------------------------------------------------
    @classmethod
    def exists(cls, path) -> bool:
        return _reachable_exists(as_location(path) / STORE_FILE)

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

        ``order``: the sample id at each row position, a permutation of 0..N-1 (default: the ids in order);
        ``order_seed``: the seed it was permuted with (None: it is the source's own order).
        """
        num_samples = dataset.num_samples
        for name, value in (("samples", num_samples), ("views", num_views), ("block", block)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"a store needs at least 1 {name}, not {value}")
        loc = as_location(path)
        if _reachable_exists(loc) and loc.listdir():
            if not _unfinished_creation(loc):
                raise UserError(f"{loc} exists and is not a store: choose an empty or new directory for --store")
            for name in CREATION_FILES:  # nothing was ever committed without store.json: start over
                (loc / name).remove_tree()
        order = np.arange(num_samples, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
        if order.shape != (num_samples,) or not np.array_equal(np.sort(order), np.arange(num_samples)):
            raise ValueError(f"a store's order must be a permutation of its {num_samples} sample ids")
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
        return self.record.num_samples

    @property
    def num_views(self) -> int:
        return self.record.num_views

    @property
    def block(self) -> int:
        return self.record.block

    @property
    def num_blocks(self) -> int:
        return -(-self.num_samples // self.block)

    def block_range(self, block: int) -> range:
        """The row positions of ``block`` in every [V, N] array (its samples are ``block_ids``)."""
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
        """The sample ids of ``block``, at its row positions: ``order[block * B : (block + 1) * B]``."""
        return self.order[block * self.block : (block + 1) * self.block]

    def positions(self, ids) -> np.ndarray:
        """The row position of each sample id in ``ids`` (the inverse of ``order``)."""
        inverse = np.empty(self.num_samples, np.int64)
        inverse[self.order] = np.arange(self.num_samples)
        return inverse[np.asarray(ids, dtype=np.int64)]

    def units(self, num_views: int) -> list[tuple[int, int]]:
        """Every (view, block) unit of the first ``num_views`` views, view-major."""
        return [(v, b) for v in range(num_views) for b in range(self.num_blocks)]

    def add_views(self, num_views: int) -> None:
        """Extend the view axis of the plan and every teacher to ``num_views``."""
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
        return UnitArrays(self.path / "plan", self.block)

    def teacher_ids(self) -> list[str]:
        root = self.path / "teachers"
        return [name for name in root.listdir() if (root / name / "teacher.json").exists()]

    def teacher_info(self, teacher_id: str) -> TeacherRecord:
        """teacher.json of ``teacher_id``; an unknown id names the known ones."""
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
        return backend(self.teacher_info(teacher_id).format)(self.path / "teachers" / teacher_id, self.block)

    def lock_teacher(self, teacher_id: str) -> WriterLock:
        """A lock that lets one extraction at a time write ``teacher_id`` (use with ``with``)."""
        return WriterLock(
            self.path / "teachers" / _plain(teacher_id) / "lock.json",
            f"teacher '{teacher_id}' in {self.path}",
            tidy=self.path,
        )

    def create_teacher(self, teacher_id: str, info: TeacherRecord, specs: dict[str, ArraySpec]) -> CommittedUnits:
        """Create a teacher's arrays, or reopen them; ``info`` (teacher.json, with its ``views``) is written either way."""
        if info.views is None:
            raise ValueError("a teacher's record needs its view count (views) before its arrays are created")
        root = self.path / "teachers" / _plain(teacher_id)
        group = backend(info.format).create(root, specs, self.num_views, self.num_samples, self.block)
        (root / "teacher.json").write_json(info.to_dict())
        return group

    # -- statistics: reductions over a teacher's cache ---------------------------------------
    def write_stats(self, teacher_id: str, arrays: dict[str, np.ndarray], info: dict) -> None:
        """Replace ``stats/<teacher_id>/``: small arrays, written whole, then their description."""
        root = self.path / "stats" / _plain(teacher_id)
        group = root.open_group("w")
        for name, data in arrays.items():
            group.create_array(name, data=np.ascontiguousarray(data), compressors=[compressor(data.dtype)])
        (root / "stats.json").write_json(info)

    def read_stats(self, teacher_id: str, name: str) -> np.ndarray | None:
        root = self.path / "stats" / _plain(teacher_id)
        if not (root / "stats.json").exists():
            return None
        return root.open_group("r")[name][:]


def _check_format(path: Location, version) -> None:
    """Refuse a store of another format before reading its fields: they may mean something else there."""
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UserError(
            f"store {path} was written by a newer pipeline (store format {version}; this one reads {FORMAT_VERSION}): "
            "upgrade this pipeline to read it"
        )
    if version != FORMAT_VERSION:
        raise UserError(
            f"store {path} has store format {version}, this pipeline reads format {FORMAT_VERSION} (blocks that are random "
            "samples of the dataset, top-k logits with their exact tail): extract it again into a new --store with the same "
            f"`pipeline extract` flags (the ones it was made with are in {path / 'logs'}/extract-*.yaml)"
        )


def _reachable_exists(loc: Location) -> bool:
    """``loc.exists()``, within a time limit, with an unreachable file system or bucket turned into one clear line."""
    return loc.reach()


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
