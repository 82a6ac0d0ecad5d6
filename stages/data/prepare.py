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
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import uuid
from dataclasses import asdict, dataclass

import numpy as np

from storage import Location, UserError
from storage.location import answering
from storage.lock import WriterLock, remove_stale_temp_files

from ..progress import Progress
from ..settings import MAX_BLOCK, SEED, SIZE, Int, Name, Optional, setting
from .datasets import FolderDataset, dataset_kind, open_dataset
from .decode import check_pixels, libjpeg_messages
from .image_dataset import ImageDataset
from .replay import sample_order
from .wds_dataset import IMAGE_EXTENSIONS, MANIFEST, _split_key

log = logging.getLogger(__name__)

FORMAT = 1
RECORDS = ".prepare"  # hidden: a glob for the shards never sees it
CLAIM = "settings.json"
LOCK = "prepare.lock"  # one run writes an output at a time: a second would remove the first one's temporary shards
READ_CHUNK = 64  # images read from the source at a time: one ranged read per run of neighbours for tar sources
KEY_SOURCE_CHARS = 60  # of the source key kept in a sample's key (USTAR names stop at 100 characters)


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


# -- the output: claimed, resumed, finished --------------------------------------------------------


def claim_output(out: Location, identity: dict, source: str) -> bool:
    """Check that ``out`` is empty or holds this same preparation, and claim it; True when it is already finished.

    Refused before anything is written: a folder prepared from other data or with other settings (its shards would
    mix with these), and a folder holding files that no preparation wrote.
    """
    claim, manifest = out / RECORDS / CLAIM, out / MANIFEST
    made = _read_json(claim) or _read_json(manifest)
    if made is not None:
        _refuse_other(out, made, identity)
    elif out.listdir():
        raise UserError(
            f"{out} is not empty and holds no prepared shards (no {MANIFEST}): prepare into a new or empty --out"
        )
    if not claim.exists():
        claim.write_json({**identity, "source": source})
    return manifest.exists()


def _read_json(loc: Location) -> dict | None:
    if not loc.exists():
        return None
    try:
        data = loc.read_json()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {loc}: {e}; it is damaged: remove the folder and prepare again") from None
    if not isinstance(data, dict):
        raise UserError(f"{loc} is not a preparation record: remove the folder and prepare again")
    return data


def _refuse_other(out: Location, made: dict, identity: dict) -> None:
    """One line naming what differs between the preparation in ``out`` and this one."""
    differ = [k for k in identity if made.get(k) != identity[k]]
    if not differ:
        return
    if "fingerprint" in differ or "num_samples" in differ:
        what = f"from other data ({made.get('source')}, {made.get('num_samples')} samples, fingerprint {str(made.get('fingerprint'))[:12]})"
    else:
        what = "with other settings (" + ", ".join(f"{k} {made.get(k)}, not {identity[k]}" for k in differ) + ")"
    raise UserError(f"{out} already holds shards prepared {what}: prepare into another --out, or remove {out} first")


def finished_shards(out: Location, plan: ShardPlan, identity: dict) -> dict[int, dict]:
    """The records of the shards already finished for this identity: record present and the shard of its recorded size.

    A shard whose record is missing, damaged or from another identity is made again (its bytes come out the same).
    """
    sizes, want = out.file_sizes(), digest(identity)  # one listing
    done = {}
    for k in range(plan.num_shards):
        if record_name(k) not in sizes:
            continue
        try:
            record = (out / record_name(k)).read_json()
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue  # not a record this tool wrote: the shard is made again
        if (
            record.get("identity") == want
            and record.get("name") == plan.name(k)
            and sizes.get(plan.name(k)) == record.get("bytes")
        ):
            done[k] = record
    return done


def write_manifest(
    out: Location, job: PrepareJob, plan: ShardPlan, classes: list[str], records: dict[int, dict]
) -> dict:
    """The manifest, written last: its presence says every shard is finished."""
    import PIL

    missing = [plan.name(k) for k in range(plan.num_shards) if k not in records]
    if missing:
        raise UserError(
            f"{len(missing)} shard(s) are not finished ({missing[0]}, ...): run the same command again to make them"
        )
    shards = [{key: records[k][key] for key in ("name", "samples", "bytes", "sha256")} for k in range(plan.num_shards)]
    manifest = {
        **job.identity(len(plan.order)),
        "source": job.source,
        "classes": list(classes),
        "num_shards": plan.num_shards,
        "pattern": plan.pattern,
        "shards": shards,
        "versions": {"pillow": PIL.__version__},
    }
    (out / MANIFEST).write_json(manifest)
    return manifest


@dataclass
class PrepareResult:
    """What a run of ``prepare`` did, and the manifest it ended with."""

    written: int  # shards written by this run
    skipped: int  # shards an earlier run had finished
    manifest: dict
    already: bool  # the output was finished before this run: nothing was written


def prepare(job: PrepareJob, dataset: ImageDataset, write_shards=None, note: str | None = None) -> PrepareResult:
    """Claim the output, write its unfinished shards, then the manifest; resumable (see the module docstring).

    ``write_shards(pending, plan)`` writes the shards numbered ``pending`` and returns their records by number
    (the command passes Ray actors'); default: in this process, one after the other. ``note`` is logged once
    the output is claimed, when there is work to do.
    """
    out = Location(job.out)
    plan, identity = ShardPlan.of(len(dataset), job.settings), job.identity(len(dataset))
    if claim_output(out, identity, job.source):
        return PrepareResult(0, plan.num_shards, _read_json(out / MANIFEST), already=True)
    with WriterLock(out / RECORDS / LOCK, f"{out}", busy="is being prepared"):
        return _write_rest(out, job, dataset, plan, identity, write_shards, note)


def _write_rest(
    out: Location,
    job: PrepareJob,
    dataset: ImageDataset,
    plan: ShardPlan,
    identity: dict,
    write_shards,
    note: str | None,
) -> PrepareResult:
    """The claimed output's unfinished shards, then its manifest: under the output's lock."""
    if note:
        log.info(note)
    if (
        out.is_local
    ):  # a killed run's unfinished shards (object stores get whole uploads); under the lock, every one is stale
        remove_stale_temp_files(out, older_than=0.0)
    done = finished_shards(out, plan, identity)
    pending = [k for k in range(plan.num_shards) if k not in done]
    log.info(
        "prepare %s -> %s: %d samples in %d shards, %d already finished",
        job.source,
        out,
        len(dataset),
        plan.num_shards,
        len(done),
    )
    if pending:
        done.update(
            write_shards(pending, plan) if write_shards is not None else ShardMaker(job, dataset).write_all(pending)
        )
    manifest = write_manifest(out, job, plan, dataset.classes, done)
    return PrepareResult(len(pending), plan.num_shards - len(pending), manifest, already=False)


# -- writing one shard -----------------------------------------------------------------------------


class ShardMaker:
    """Writes and commits whole shards of one job; what the command runs in-process and each Ray actor holds.

    Plain Python (no Ray): ``maker.write(k)`` writes shard k and returns its record.
    """

    def __init__(self, job: PrepareJob, dataset: ImageDataset | None = None):
        self.job, self.out = job, Location(job.out)
        self.dataset = dataset if dataset is not None else open_source(job.source)
        if self.dataset.fingerprint() != job.fingerprint:
            raise UserError(
                f"{job.source} holds other images here than where the preparation started (fingerprint differs): every node must see the same data"
            )
        self.plan = ShardPlan.of(len(self.dataset), job.settings)
        self.identity = digest(job.identity(len(self.dataset)))

    def write(self, k: int) -> dict:
        """Write shard k whole, put it in place, then its record (from which on it counts); returns the record."""
        name = self.plan.name(k)
        target = self.out / name
        tmp = f"{self.out.path}/.{name}.{uuid.uuid4().hex[:8]}.tmp" if self.out.is_local else _local_temp()
        try:
            if self.out.is_local:
                target.refuse_links()
                self.out.makedirs()
            samples, size, sha = write_tar(tmp, self.samples(k))
            _commit(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        record = {"name": name, "samples": samples, "bytes": size, "sha256": sha, "identity": self.identity}
        (self.out / record_name(k)).write_json(record)  # the shard counts from here on
        return record

    def write_all(self, shards: list[int]) -> dict[int, dict]:
        """Write ``shards`` one after the other, logging progress; their records by number."""
        progress = Progress("prepare", sum(len(self.plan.positions(k)) for k in shards), unit="images")
        records = {}
        for k in shards:
            records[k] = self.write(k)
            progress.update(records[k]["samples"])
        return records

    def samples(self, k: int):
        """Shard k's samples as (key, extension, image bytes, label), in the plan's order."""
        positions = self.plan.positions(k)
        for lo in range(positions.start, positions.stop, READ_CHUNK):
            ids = self.plan.order[lo : min(lo + READ_CHUNK, positions.stop)]
            for j, (i, (data, ext, where)) in enumerate(zip(ids, source_bytes(self.dataset, ids))):
                data, ext = convert(data, ext, self.job.settings.max_side, self.job.settings.quality, where)
                yield sample_key(lo + j, self.dataset.keys[i]), ext, data, int(self.dataset.labels[i])


def sample_key(position: int, source_key: str) -> str:
    """Unique (the position) and traceable (the source key, made safe: webdataset splits keys at '.', tar paths at '/').
    A class folder whose files repeat its name (ImageNet's n01440764/n01440764_10026.JPEG) is said once."""
    stem = source_key.rsplit(".", 1)[0] if "/" not in source_key.rsplit(".", 1)[-1] else source_key
    folder, _, name = stem.rpartition("/")
    if folder and name.startswith(folder.rsplit("/", 1)[-1]):
        stem = name
    return f"{position:08d}-{re.sub(r'[^A-Za-z0-9_-]', '_', stem)[-KEY_SOURCE_CHARS:]}"


def source_bytes(dataset: ImageDataset, ids: np.ndarray) -> list[tuple[bytes, str, str]]:
    """(encoded image, its extension, where it is, for errors) of each id: tar members in one pass, else the files."""
    if isinstance(dataset, FolderDataset):
        out = []
        for i in ids:
            path = dataset.root / dataset.keys[i]
            try:
                out.append((path.read_bytes(), path.suffix.lower().lstrip("."), str(path)))
            except OSError as e:
                raise UserError(
                    f"cannot read image {path}: {e.strerror or e}; replace the file, then run the same command again"
                ) from None
        return out
    blobs = dataset.encoded(ids)
    urls = dataset.urls  # a WdsDataset (``open_source`` allows no other kind)
    return [
        (bytes(b), dataset.ext[i], f"shard {urls[dataset.shard[i]]}: sample {dataset.keys[i].split('/', 1)[1]}")
        for b, i in zip(blobs, ids)
    ]


def convert(data: bytes, ext: str, max_side: int | None, quality: int, where: str) -> tuple[bytes, str]:
    """An image as it goes into a shard: kept byte for byte, or re-encoded when larger than ``max_side``.

    Every image is decoded once here (a JPEG at 1/8 scale: the entropy-coded data is all read, so a truncated
    file fails), so an unreadable one stops the run with its name before a shard holding it exists.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im, libjpeg_messages(str(where), im.format == "JPEG"):
            w, h = im.size
            check_pixels(h, w)  # the replay's own bound, before anything is decoded
            if max_side is not None and max(w, h) > max_side:
                return _reencode(im, max_side, quality), "jpg"
            if ext in IMAGE_EXTENSIONS:  # what ``wds:`` reads; other formats are converted to PNG, losslessly
                im.draft("RGB", (1, 1))
                im.load()
                return data, ext
            out = (
                io.BytesIO()
            )  # bmp, tiff, ppm: pixels kept, as PNG (what ``wds:`` reads), in RGB as every reader sees them
            im.convert("RGB").save(out, format="PNG")
            return out.getvalue(), "png"
    except Exception as e:
        raise UserError(
            f"cannot read image {where} ({e}): replace the file, then run the same command again "
            "(finished shards are kept; if you remove it instead, the data changes: prepare into a new --out)"
        ) from None


def _reencode(im, max_side: int, quality: int) -> bytes:
    """The image with its longer side at ``max_side`` (aspect kept; Lanczos, exact), as a JPEG of ``quality``."""
    from PIL import Image

    w, h = im.size
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=quality)
    return out.getvalue()


class _Hashing:
    """A write-only file that hashes and counts what passes through it to ``f``."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)


def write_tar(path: str, samples) -> tuple[int, int, str]:
    """Write ``samples`` (key, extension, bytes, label) as a new tar at local ``path``: (samples, bytes, sha256)."""
    import webdataset as wds

    count = 0
    with open(path, "wb") as f:
        hashing = _Hashing(f)
        with wds.TarWriter(hashing, encoder=False, mtime=0) as tar:  # mtime=0: the same samples, the same bytes
            for key, ext, data, label in samples:
                tar.write({"__key__": key, ext: data, "cls": str(label).encode()})
                count += 1
        f.flush()
        os.fsync(f.fileno())
    return count, hashing.size, hashing.sha.hexdigest()


def _local_temp() -> str:
    """A local file to write a shard bound for object storage into, before its one upload."""
    fd, path = tempfile.mkstemp(suffix=".tar")
    os.close(fd)
    return path


def _commit(tmp: str, target: Location) -> None:
    """Put a finished shard in place whole: a rename on a local disk, one upload under its final name elsewhere."""
    if target.is_local:
        os.replace(tmp, target.path)
        return
    with answering(target.url):
        target.fs.put_file(tmp, target.path)


# -- checking prepared shards ----------------------------------------------------------------------


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
    listed, total, prefix = _manifest_fields(_read_json(out / MANIFEST), out / MANIFEST)
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
            key, ext = _split_key(member.name)
            if member.isfile() and key is not None:
                found.setdefault(key, set()).add("image" if ext in IMAGE_EXTENSIONS else ext)
    return sum({"image", "cls"} <= kinds for kinds in found.values())


# -- what re-encoding costs ------------------------------------------------------------------------


def crop_pixels(longer_side: float, scale: float) -> tuple[int, int]:
    """Source pixels (w, h) of a 4:3 crop of ``scale`` of the area of a 4:3 image whose longer side is ``longer_side``."""
    w = (scale**0.5) * longer_side
    return round(w), round(0.75 * w)


def check_max_side(max_side: int | None, size: int, scale_min: float, where: str, force: bool = False) -> str | None:
    """Refuse a ``max_side`` below the view size (unless ``force``); else the line saying what it costs small crops."""
    if max_side is None:
        return None
    w, h = crop_pixels(max_side, scale_min)
    ow, oh = crop_pixels(500, scale_min)
    cost = f"a crop of {scale_min:g} of the area of a 4:3 image then has about {w}x{h} source pixels (of a 500x375 original: {ow}x{oh})"
    if max_side < size and not force:
        raise UserError(
            f"--max-side {max_side} is below the view size {size} ({where}): every view would be upsampled, and crops of small regions "
            f"get fewer source pixels still: {cost}; use --max-side {size} or more, or --force to prepare anyway"
        )
    return f"images above {max_side} px are re-encoded smaller: {cost}"
