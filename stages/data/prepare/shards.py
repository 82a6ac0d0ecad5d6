"""Writing one shard: its samples read from the source in the plan's order, each image kept or re-encoded smaller,
the tar written whole, hashed as it is written, and put in place in one rename (or one upload).

Also what re-encoding costs small crops (``check_max_side``), said before a preparation starts.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import uuid

import numpy as np

from storage import Location, UserError
from storage.file_systems import answering

from ...progress import Progress
from ..decode import check_pixels, libjpeg_messages
from ..folder_dataset import FolderDataset
from ..image_dataset import ImageDataset
from ..wds_index import IMAGE_EXTENSIONS
from .plan import PrepareJob, ShardPlan, digest, open_source, record_name

READ_CHUNK = 64  # images read from the source at a time: one ranged read per run of neighbours for tar sources
KEY_SOURCE_CHARS = 60  # of the source key kept in a sample's key (USTAR names stop at 100 characters)


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
            # bmp, tiff, ppm: pixels kept, as PNG (what ``wds:`` reads), in RGB as every reader sees them
            out = io.BytesIO()
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
