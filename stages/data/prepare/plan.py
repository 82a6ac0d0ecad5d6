"""What a preparation is (settings, job, identity) and which samples go into which shard (``ShardPlan``).

Small serialisable values: the command, each Ray actor and a rerun build the same plan from them, so a resumed
run makes the same shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from storage import UserError

from ...settings import MAX_BLOCK, SEED, SIZE, Int, Name, Optional, setting
from ..datasets import dataset_kind, open_dataset
from ..image_dataset import ImageDataset
from ..replay import sample_order


FORMAT = 1
RECORDS = ".prepare"  # hidden: a glob for the shards never sees it
CLAIM = "settings.json"
LOCK = "prepare.lock"  # one run writes an output at a time: a second would remove the first one's temporary shards


@dataclass(frozen=True)
class PrepareSettings:
    """What the shards are made with; each field is a flag of ``pipeline prepare`` and part of the output's identity."""

    seed: int = setting(0, SEED, "seed of the random order of samples across shards")
    shard_size: int = setting(1000, Int(1, MAX_BLOCK), "samples per shard (the last one holds the rest)")
    max_side: int | None = setting(
        None,
        Optional(SIZE),
        "re-encode images whose longer side is above this as JPEG with that longer side (aspect kept); "
        "images within it are kept byte for byte",
        show_default="off: every image kept byte for byte",
    )
    quality: int = setting(90, Int(1, 100), "JPEG quality of re-encoded images")
    prefix: str = setting("train", Name(), "shard file names: PREFIX-000000.tar, PREFIX-000001.tar, ...")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PrepareJob:
    """One preparation, as small serialisable values: what the command and each Ray actor build their part from."""

    source: str
    out: str
    settings: PrepareSettings
    fingerprint: str  # of the source as the driver opened it: an actor that sees other images refuses

    def identity(self, num_samples: int) -> dict:
        """What makes two outputs the same: the data (by fingerprint, so a moved folder is the same) and the settings."""
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "num_samples": num_samples,
            **self.settings.to_dict(),
        }


def digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ShardPlan:
    """Which samples go where: shard k holds positions [k * S, (k + 1) * S) of a seeded permutation of the ids."""

    order: np.ndarray  # (N,) int64, the sample id at each position
    shard_size: int
    prefix: str

    @classmethod
    def of(cls, num_samples: int, settings: PrepareSettings) -> "ShardPlan":
        # The store's own permutation (a counter-based hash, the same with any numpy): shards of a class-ordered
        # source are random samples of it.
        return cls(sample_order(num_samples, settings.seed), settings.shard_size, settings.prefix)

    @property
    def num_shards(self) -> int:
        return -(-len(self.order) // self.shard_size)

    def positions(self, k: int) -> range:
        return range(k * self.shard_size, min((k + 1) * self.shard_size, len(self.order)))

    def name(self, k: int) -> str:
        return f"{self.prefix}-{k:06d}.tar"

    @property
    def pattern(self) -> str:
        """The brace pattern of every shard, for ``--data wds:OUT/PATTERN``."""
        return f"{self.prefix}-{{000000..{self.num_shards - 1:06d}}}.tar"


def record_name(k: int) -> str:
    return f"{RECORDS}/shard-{k:06d}.json"


def open_source(spec: str) -> ImageDataset:
    """The images to prepare: files in class folders or in tar shards (the kinds with encoded images to keep)."""
    if dataset_kind(spec).name not in ("folder", "wds"):
        raise UserError(
            f"pipeline prepare writes image files: use --data folder:PATH or wds:PATTERN, not {spec} (its images are made in memory)"
        )
    return open_dataset(spec)
