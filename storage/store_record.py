"""store.json as one typed record: what a store was made from, and how its rows are laid out.

Written by ``Store.create`` (and again by ``Store.add_views``), parsed and checked once when a ``Store``
opens (``StoreRecord.from_dict``); every stage reads ``store.record``, never the JSON. A missing or
wrongly typed field, or a number that contradicts another, is one ``ValueError`` naming the field
(``Store`` turns it into one line naming the file).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import UserError

# 2: rows in a recorded order of the sample ids (before: block b was ids b*B..), top-k rows with exact tail mass.
FORMAT_VERSION = 2
ORDER_KINDS = ("permuted", "source")

# Sane bounds for the numbers a store's records hold: each sizes arrays or loops before any data is read, so a
# hand-edited 1e12 must be refused here, not met as an allocation of terabytes. The command-line flags that make
# them have the same or tighter bounds (stages.settings).
MAX_SAMPLES = 1 << 33  # 8.6 billion rows
MAX_VIEWS = 100_000
MAX_BLOCK = 1 << 20
MAX_SIZE = 4096  # px
MAX_CLASSES = 1 << 20
MAX_WIDTH = 1 << 20  # a feature or token vector's length, a teacher's token count
MAX_SEED = 2**63 - 1  # what numpy's SeedSequence and torch.manual_seed take


@dataclass(frozen=True, kw_only=True)
class DatasetRecord:
    """The training data a store was made from (``ImageDataset.describe``): stages check its fingerprint."""

    source: str  # --data as given: digits, folder:PATH, fake:N, wds:PATTERN
    fingerprint: str  # hash of count, keys and labels
    num_samples: int
    num_classes: int
    classes: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(self.classes))

    @classmethod
    def from_dict(cls, data, where: str = "dataset") -> DatasetRecord:
        f = _Fields(data, where)
        return cls(
            source=f.text("source"),
            fingerprint=f.text("fingerprint"),
            num_samples=f.count("num_samples", MAX_SAMPLES),
            num_classes=f.count("num_classes", MAX_CLASSES),
            classes=f.texts("classes"),
        )


@dataclass(frozen=True, kw_only=True)
class PlanRecord:
    """The view plan: its recipe (what ``ViewRecipe.from_dict`` takes), its seed, and the size views are fingerprinted at."""

    recipe: dict
    seed: int
    size: int  # pixels, square: the render size of the first teacher, at which the plan's fingerprints were taken

    @classmethod
    def from_dict(cls, data, where: str = "plan") -> PlanRecord:
        f = _Fields(data, where)
        return cls(recipe=f.mapping("recipe"), seed=f.count("seed", MAX_SEED, least=0), size=f.count("size", MAX_SIZE))


@dataclass(frozen=True, kw_only=True)
class OrderRecord:
    """How row positions map to sample ids: a seeded permutation, or the source's own order (tar shards)."""

    kind: str  # one of ORDER_KINDS
    checksum: str  # of the ``order`` array, checked when it is read
    seed: int | None = None  # permuted only

    @classmethod
    def from_dict(cls, data, where: str = "order") -> OrderRecord:
        f = _Fields(data, where)
        kind = f.text("kind")
        if kind not in ORDER_KINDS:
            raise ValueError(f"field '{where}.kind' must be one of {', '.join(ORDER_KINDS)}, not '{kind}'")
        return cls(
            kind=kind,
            checksum=f.text("checksum"),
            seed=f.count("seed", MAX_SEED, least=0) if kind == "permuted" else None,
        )


@dataclass(frozen=True, kw_only=True)
class StoreRecord:
    """One store's store.json."""

    format: int  # FORMAT_VERSION
    num_samples: int  # N: rows of every [V, N, ...] array
    num_views: int  # V: views of the plan (a teacher's own count is in its teacher.json)
    block: int  # samples per shard, the unit of work
    dataset: DatasetRecord
    plan: PlanRecord
    order: OrderRecord
    versions: dict  # library versions of the store's creation (the plan's renders)

    @classmethod
    def from_dict(cls, data) -> StoreRecord:
        f = _Fields(data, "")
        record = cls(
            format=f.integer("format"),
            num_samples=f.count("num_samples", MAX_SAMPLES),
            num_views=f.count("num_views", MAX_VIEWS),
            block=f.count("block", MAX_BLOCK),
            dataset=DatasetRecord.from_dict(f.mapping("dataset")),
            plan=PlanRecord.from_dict(f.mapping("plan")),
            order=OrderRecord.from_dict(f.mapping("order")),
            versions=f.versions("versions"),
        )
        record.check()
        return record

    def check(self) -> None:
        """The numbers that must agree with each other (a hand-edited or damaged file breaks them)."""
        if self.dataset.num_samples != self.num_samples:
            raise ValueError(
                f"field 'dataset.num_samples' is {self.dataset.num_samples}, but the store's arrays have num_samples {self.num_samples} rows"
            )
        if len(self.dataset.classes) != self.dataset.num_classes:
            raise ValueError(
                f"field 'dataset.classes' names {len(self.dataset.classes)} classes, but 'dataset.num_classes' is {self.dataset.num_classes}"
            )

    def to_dict(self) -> dict:
        """store.json's contents: tuples as lists, no ``order.seed`` for the source's own order."""
        out = dataclasses.asdict(self)
        out["dataset"]["classes"] = list(self.dataset.classes)
        if self.order.seed is None:
            del out["order"]["seed"]
        return out

    def replace(self, **changes) -> StoreRecord:
        return dataclasses.replace(self, **changes)


class _Fields:
    """Typed reads of one JSON object's fields; a miss names the field by its dotted path."""

    def __init__(self, data, where: str):
        if not isinstance(data, dict):
            raise ValueError(
                f"field '{where}' must be an object, not {type(data).__name__}"
                if where
                else "it must hold a JSON object"
            )
        self.data, self.where = data, where

    def _get(self, key: str, ok, kind: str):
        name = f"{self.where}.{key}" if self.where else key
        if key not in self.data:
            raise ValueError(f"field '{name}' is missing")
        value = self.data[key]
        if not ok(value):
            raise ValueError(f"field '{name}' must be {kind}, not {value!r}")
        return value

    def text(self, key: str) -> str:
        return self._get(key, lambda v: isinstance(v, str) and v != "", "a non-empty string")

    def texts(self, key: str) -> tuple[str, ...]:
        return tuple(
            self._get(key, lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings")
        )

    def integer(self, key: str) -> int:
        return self._get(key, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")

    def count(self, key: str, most: int, least: int = 1) -> int:
        """A whole number in [least, most]: ``most`` is a sane bound (see MAX_SAMPLES), a number that sizes nothing silly."""
        return self._get(
            key,
            lambda v: isinstance(v, int) and not isinstance(v, bool) and least <= v <= most,
            f"a whole number in [{least}, {most:,}]",
        )

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        return self._get(key, lambda v: isinstance(v, str) and v in options, f"one of {', '.join(options)}")

    def subset(self, key: str, options: tuple[str, ...]) -> tuple[str, ...]:
        """A non-empty list of distinct names out of ``options``."""

        def ok(v):
            return (
                isinstance(v, list)
                and v
                and len(set(map(str, v))) == len(v)
                and all(isinstance(x, str) and x in options for x in v)
            )

        return tuple(self._get(key, ok, f"a list of distinct names out of {', '.join(options)}"))

    def numbers(self, key: str, length: int) -> tuple[float, ...]:
        def ok(v):
            return (
                isinstance(v, list)
                and len(v) == length
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            )

        return tuple(self._get(key, ok, f"a list of {length} finite numbers"))

    def versions(self, key: str) -> dict:
        """Library versions: names to version strings (what made the arrays, for the reader to compare)."""
        ok = lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values())  # noqa: E731
        return self._get(key, ok, "an object of version strings")

    def mapping(self, key: str) -> dict:
        return self._get(key, lambda v: isinstance(v, dict), "an object")


def check_format(path, version) -> None:
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


def check_sizes(record: StoreRecord, order_name: str, order_shape, plan_shape, plan_shards) -> None:
    """store.json's N, V and block against the shapes of the arrays they describe (the order, the plan's
    fingerprints); ``ValueError`` names the field that disagrees."""
    N, V, B = record.num_samples, record.num_views, record.block
    if tuple(order_shape) != (N,):
        raise ValueError(f"field 'num_samples' is {N}, but the {order_name} array has {order_shape[0]} rows")
    if plan_shape[1] != N:
        raise ValueError(f"field 'num_samples' is {N}, but the plan's arrays have {plan_shape[1]} rows")
    if V > plan_shape[0]:  # the plan grows first when views are added: it may hold more views, never fewer
        raise ValueError(f"field 'num_views' is {V}, but the plan's arrays hold {plan_shape[0]} views")
    if plan_shards is not None and plan_shards[1] != B:
        raise ValueError(f"field 'block' is {B}, but the plan's shards hold {plan_shards[1]} samples")
