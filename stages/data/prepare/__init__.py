"""Image sources as webdataset shards made for replay: what ``pipeline prepare`` writes and checks.

Why: a store made from tar shards (``wds:``) keeps the shards' order, since they are read front to back, so
its blocks are random samples of the data only if the shards were shuffled when written (DESIGN.md, "Sample
blocks"). Class-ordered sources (ImageNet's folders) are written here in a seeded random order across shards,
ready for ``--data wds:OUT/train-{000000..000NNN}.tar``. Optionally each image whose longer side is above
``max_side`` is re-encoded smaller: decoding is most of a replayed view's cost, and a 500x375 JPEG decodes
about 1.8x faster at 320 px (FACTS.md); the price is fewer source pixels in crops of small regions.

Layout::

    OUT/train-000000.tar ...         samples in the seeded order: KEY.jpg (or a kept image's own extension) and
                                     KEY.cls (the class, decimal), webdataset's convention, what ``wds:`` reads
    OUT/manifest.json                written last: source, settings, class names, each shard's name, sample
                                     count, bytes and sha256, the total count
    OUT/.prepare/settings.json       what the folder is being prepared from (written first: a rerun with other
                                     data or settings is refused, never mixed in)
    OUT/.prepare/shard-000012.json   one record per finished shard: its samples, bytes and sha256
    OUT/.prepare/prepare.lock        held while a run writes (a second run into the same output is refused)

Commit protocol, as the store's: a shard is written whole under a temporary name and renamed into place (on
object storage, uploaded under its final name in one PUT), then its record is written. A shard counts as
finished only with its record and a file of the recorded size, so a killed run, rerun with the same command,
skips finished shards and makes the rest, and ends with the same bytes as an uninterrupted run (the same
Pillow: re-encoding depends on its version, recorded in the manifest). ``manifest.json`` exists only once
every shard does.

The package, one module per part of the job: ``plan`` (settings, the job, which samples go to which shard),
``output`` (the folder claimed, resumed and finished: ``prepare``), ``shards`` (one shard written and committed,
images re-encoded) and ``verify`` (prepared shards checked against their manifest).
"""

from .output import PrepareResult, claim_output, finished_shards, prepare, read_json, write_manifest
from .plan import CLAIM, FORMAT, LOCK, RECORDS, PrepareJob, PrepareSettings, ShardPlan, digest, open_source, record_name
from .shards import (
    KEY_SOURCE_CHARS,
    READ_CHUNK,
    ShardMaker,
    check_max_side,
    convert,
    crop_pixels,
    sample_key,
    source_bytes,
    write_tar,
)
from .verify import VerifyReport, check_shard, count_samples, is_prepared, verify_prepared

__all__ = [
    "CLAIM",
    "FORMAT",
    "KEY_SOURCE_CHARS",
    "LOCK",
    "READ_CHUNK",
    "RECORDS",
    "PrepareJob",
    "PrepareResult",
    "PrepareSettings",
    "ShardMaker",
    "ShardPlan",
    "VerifyReport",
    "check_max_side",
    "check_shard",
    "claim_output",
    "convert",
    "count_samples",
    "crop_pixels",
    "digest",
    "finished_shards",
    "is_prepared",
    "open_source",
    "prepare",
    "read_json",
    "record_name",
    "sample_key",
    "source_bytes",
    "verify_prepared",
    "write_manifest",
    "write_tar",
]
