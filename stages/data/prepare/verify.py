"""Checking prepared shards against their manifest (``pipeline verify`` of a prepared folder), and telling a
prepared folder from a store."""

from __future__ import annotations

import hashlib
import re
import tarfile
from dataclasses import dataclass

from storage import Location, UserError
from storage.file_systems import answering

from ..wds_index import IMAGE_EXTENSIONS, MANIFEST, split_key
from .output import read_json
from .plan import CLAIM, RECORDS


@dataclass
class VerifyReport:
    """``verify_prepared``'s findings: one line per problem (none: sound)."""

    shards: int
    samples: int
    problems: list[str]


def is_prepared(where: str) -> bool:
    """Whether ``where`` holds shards made by ``pipeline prepare`` (a manifest.json, or the records of an unfinished
    prepare) rather than a store."""
    loc = Location(where)
    if (loc / "store.json").reach():  # reach: an endpoint that is down is one line
        return False
    return (loc / MANIFEST).exists() or (loc / RECORDS / CLAIM).exists()


def verify_prepared(out: Location) -> VerifyReport:
    """Every shard of the manifest against it (present, size, sha256, sample count), and no stray shard beside them."""
    if not (out / MANIFEST).exists():
        raise UserError(
            f"{out} holds the shards of a `pipeline prepare` that has not finished (no {MANIFEST} yet): "
            "run the same prepare command again to finish them, then verify"
        )
    listed, total, prefix = _manifest_fields(read_json(out / MANIFEST), out / MANIFEST)
    sizes = out.file_sizes()
    problems = []
    for shard in listed:
        problems += check_shard(out, shard, sizes.get(shard["name"]))
    counted = sum(int(s["samples"]) for s in listed)
    if counted != total:
        problems.append(f"{MANIFEST}: its shards hold {counted:,} samples, its total says {total:,}")
    names = {s["name"] for s in listed}
    for name in sorted(sizes):
        if re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.tar", name) and name not in names:
            problems.append(f"{name}: a shard the manifest does not list (a glob for the shards would read it)")
    return VerifyReport(len(listed), total, problems)


SHARD_FIELDS = {"name": str, "bytes": int, "samples": int, "sha256": str}


def _manifest_fields(manifest, where) -> tuple[list[dict], int, str]:
    """(shards, total samples, prefix) of a manifest, each field checked for its type: a hand-edited one is one line."""

    def wrong(key: str, found, expected: str) -> UserError:
        what = "missing" if found is None else f"{type(found).__name__} {found!r:.40}"
        return UserError(f"{where}: '{key}' is {what}, expected {expected}: prepare the folder again")

    if not isinstance(manifest, dict):
        raise wrong("the manifest", manifest, "a mapping")
    for key, kind, expected in (
        ("shards", list, "a list of shards"),
        ("num_samples", int, "a whole number"),
        ("prefix", str, "a name"),
    ):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise wrong(key, manifest.get(key), expected)
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict):
            raise wrong(f"shards[{i}]", shard, "a mapping with name, bytes, samples and sha256")
        for key, kind in SHARD_FIELDS.items():
            if not isinstance(shard.get(key), kind) or isinstance(shard.get(key), bool):
                raise wrong(f"shards[{i}].{key}", shard.get(key), "a whole number" if kind is int else "a string")
    return manifest["shards"], manifest["num_samples"], manifest["prefix"]


def check_shard(out: Location, shard: dict, size: int | None) -> list[str]:
    """One line per problem of one shard: missing, of another size, other bytes, another sample count, not a tar."""
    name, want = shard["name"], int(shard["bytes"])
    if size is None:
        return [f"{name}: missing (the manifest lists it with {shard['samples']:,} samples, {want:,} bytes)"]
    if size != want:
        return [f"{name}: {size:,} bytes, the manifest says {want:,}: the file was cut short or changed"]
    try:
        with answering(out.url), (out / name).fs.open((out / name).path, "rb", block_size=8 << 20) as f:
            reader = _HashingReader(f)
            samples = count_samples(reader)
            reader.drain()
    except (tarfile.TarError, EOFError) as e:
        return [f"{name}: not a readable tar ({e}): the file is damaged"]
    problems = []
    if reader.sha.hexdigest() != shard["sha256"]:
        problems.append(f"{name}: sha256 differs from the manifest's: the file is damaged")
    if samples != int(shard["samples"]):
        problems.append(f"{name}: {samples:,} samples, the manifest says {shard['samples']:,}")
    return problems


class _HashingReader:
    """A read-only file that hashes what is read from ``f``: a tar is counted and checked in one pass."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(8 << 20):
            pass


def count_samples(f) -> int:
    """Samples in a tar stream as ``wds:`` reads them: keys with both an image and a class member."""
    found: dict[str, set] = {}
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            key, ext = split_key(member.name)
            if member.isfile() and key is not None:
                found.setdefault(key, set()).add("image" if ext in IMAGE_EXTENSIONS else ext)
    return sum({"image", "cls"} <= kinds for kinds in found.values())
