"""Image shards as the input dataset: ``wds:PATTERN``, webdataset tar shards, local or at an fsspec URL.

``PATTERN`` is a brace pattern (``train-{0000..1023}.tar``) or a glob, of local
paths or URLs (``s3://bucket/in1k/train-{0000..1023}.tar``). A sample is a run
of members sharing a key (webdataset's convention, what timm's ImageNet shards
hold): one image ``KEY.jpg|jpeg|png|webp`` and its class ``KEY.cls`` (a decimal
integer); other members (``KEY.json``...) are ignored.

* Ids: shard order (as the pattern lists them), then member order. Keys are
  ``<shard name>/<KEY>``; the fingerprint covers them, the labels, and each
  shard's name and sample count, so moving the shards elsewhere keeps it.
* The index: opening needs every sample's key, label, image size and byte
  range. One streaming pass over a shard finds them (reading only what it
  must: headers, class members and the image headers inside the stream); the
  result is kept in a local cache keyed by the shard's URL, size and
  modification stamp (an ETag on S3), so later opens read no image data.
  A tar reader stops at the first member header it cannot read as if the
  tar ended there, so the scan compares where its walk stopped with the
  file's size: only zero blocks (the end marker, the record padding) may
  follow, else the shard is damaged (one line, never a shorter shard).
* Classes: numbers (``"0"``, ``"1"``, ...), or the names a ``manifest.json``
  beside the shards gives when it lists them all (``pipeline prepare``
  writes one, ``stages.data.prepare``).
* Reading: the images of a unit's block are neighbours in the shards, so
  ``encoded`` reads them with one ranged read per run of neighbouring members
  and the bytes travel with the unit's rows to the loader workers, which
  decode them. ``image(i)`` reads one member (the odd random access).

A store made from shards keeps its blocks in this id order (``sequential``):
a block is a random sample of the data only if the shards were shuffled when
written, and ``order_note`` says when they were not.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from storage import UserError
from storage.location import storage_options
from storage.store_record import MAX_CLASSES

from .decode import decode_image
from .image_dataset import ImageDataset

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MANIFEST = "manifest.json"  # what `pipeline prepare` writes beside its shards (``stages.data.prepare``)
INDEX_VERSION = 2  # 2: a shard with a damaged member header is refused (version 1 indexed it as a shorter one)
GAP = 256 << 10  # neighbouring members closer than this are read in one request (headers and .cls between them)


def index_cache_dir() -> Path:
    """Where shard indexes are cached: the user's cache directory (``XDG_CACHE_HOME``, else ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "teacher-cache-pipeline" / "wds-index"


def _file_system(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url, **storage_options(url))


def expand(pattern: str) -> list[str]:
    """The shard URLs of a brace pattern or glob, in the pattern's order (globs sorted)."""
    import braceexpand

    urls = []
    for url in braceexpand.braceexpand(pattern):
        if any(c in url for c in "*?["):
            fs, path = _file_system(url)
            urls += sorted(fs.unstrip_protocol(p) if "://" in url else p for p in fs.glob(path))
        else:
            urls.append(url)
    return urls


def _split_key(name: str) -> tuple[str | None, str | None]:
    """webdataset's key and extension of a member name (``base_plus_ext``): ``dir/n01.jpg`` -> (``dir/n01``, ``jpg``)."""
    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match[1], match[2].lower()) if match else (None, None)


@dataclass
class ShardIndex:
    """One shard's samples: key, label, image extension, byte offset and length of the image, its (H, W)."""

    keys: list[str]
    labels: np.ndarray  # (n,) int64
    ext: list[str]
    offset: np.ndarray  # (n,) int64
    length: np.ndarray  # (n,) int64
    hw: np.ndarray  # (n, 2) int64

    def to_json(self) -> dict:
        return {
            "keys": self.keys,
            "labels": self.labels.tolist(),
            "ext": self.ext,
            "offset": self.offset.tolist(),
            "length": self.length.tolist(),
            "hw": self.hw.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> "ShardIndex":
        return cls(
            list(d["keys"]),
            np.asarray(d["labels"], np.int64),
            list(d["ext"]),
            np.asarray(d["offset"], np.int64),
            np.asarray(d["length"], np.int64),
            np.asarray(d["hw"], np.int64).reshape(-1, 2),
        )


def scan_shard(url: str) -> ShardIndex:
    """Index one shard in a single streaming pass; a sample without an image or a class is one clear line."""
    fs, path = _file_system(url)
    samples: list[dict] = []
    seen: set[str] = set()

    def finish(sample: dict | None) -> None:
        if sample is None:
            return
        if "offset" not in sample:
            raise UserError(
                f"shard {url}: sample {sample['key']} has no image ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}): add it or remove the sample's members"
            )
        if "label" not in sample:
            raise UserError(
                f"shard {url}: sample {sample['key']} has no .cls member (its class): wds datasets need KEY.cls beside each image "
                "(webdataset's and timm's convention); write the shards with labels"
            )
        samples.append(sample)

    current, last = None, None
    try:
        with fs.open(path, "rb", block_size=8 << 20) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            failed = None
            try:
                for member in tar:
                    last = member.name
                    key, ext = _split_key(member.name)
                    if not member.isfile() or key is None or (ext not in IMAGE_EXTENSIONS and ext != "cls"):
                        continue
                    if current is None or current["key"] != key:
                        finish(current)
                        if key in seen:
                            raise UserError(
                                f"shard {url}: sample {key} appears twice, apart: a sample's members must be neighbours in the tar"
                            )
                        seen.add(key)
                        current = {"key": key}
                    _take_member(url, current, ext, tar.extractfile(member).read(), member)
            except (
                tarfile.TarError,
                EOFError,
            ) as e:  # a header that cannot be read after the first (a GNU long name's...)
                failed = e
            # Where the walk stopped: the end marker of a whole tar, else the header it could not read.
            _check_end(url, fs, path, tar.offset, failed, current["key"] if current else None, last, len(seen))
            finish(current)
    except (tarfile.TarError, EOFError) as e:  # the first header
        raise UserError(f"cannot read shard {url}: {e}; the tar file is damaged or not a tar: write it again") from None
    except FileNotFoundError:
        raise UserError(f"shard {url} does not exist: check the wds pattern") from None
    if any(s["label"] < 0 for s in samples):
        bad = next(s for s in samples if s["label"] < 0)
        raise UserError(f"shard {url}: sample {bad['key']} has class {bad['label']}: classes are numbers from 0")
    return ShardIndex(
        keys=[s["key"] for s in samples],
        labels=np.asarray([s["label"] for s in samples], np.int64),
        ext=[s["ext"] for s in samples],
        offset=np.asarray([s["offset"] for s in samples], np.int64),
        length=np.asarray([s["length"] for s in samples], np.int64),
        hw=np.asarray([s["hw"] for s in samples], np.int64).reshape(-1, 2),
    )


def _check_end(
    url: str, fs, path: str, stop: int, failed: Exception | None, sample: str | None, last: str | None, read: int
) -> None:
    """One line unless the tar ends whole where the walk stopped (``stop``): only zero blocks may follow. tarfile reads a
    tar cut short, or one with a header it cannot read, as a shorter tar: its later samples would vanish silently."""
    end = _tail(fs, path, stop)
    if end == "truncated":
        where = f"at sample {sample}" if sample else "before its first sample"
        raise UserError(
            f"shard {url} is truncated (it ends {where}, without the tar's end marker): copy or write it again"
        )
    if end is not None or failed is not None:
        after = f"after member {last}, {read} samples read" if last else "before its first member"
        what = f"a member header there cannot be read ({failed or _header_problem(end)})"
        if end is not None and not any(end):
            what = "a zero block (a zeroed member header, or the end marker of tars joined together) is followed by more members"
        raise UserError(
            f"shard {url} is damaged at byte {stop} ({after}): {what}; replace the shard (copy or write it again)"
        )


def _tail(fs, path: str, stop: int) -> bytes | str | None:
    """What follows the end of a walk over a tar's members at byte ``stop``: None when it is the tar's end (zero
    blocks only, the last two of them the end marker), "truncated" when the file lacks the end marker, else the
    512-byte block at ``stop`` (members follow a header the walk could not read).

    Reads the end marker and the bytes from ``stop`` up to the first that is not zero: a whole tar's padding (under
    10 KiB as tarfile and webdataset write it), a damaged one's header.
    """
    size = fs.size(path)
    if size < 1024 or size % 512:
        return "truncated"
    with fs.open(path, "rb", block_size=64 << 10) as f:
        f.seek(size - 1024)
        if any(f.read(1024)):
            return "truncated"
        at = min(stop, size - 1024)
        f.seek(at)
        while at < size - 1024:
            chunk = f.read(min(64 << 10, size - 1024 - at))
            if not chunk:
                return "truncated"
            if chunk.count(0) != len(chunk):
                f.seek(stop)
                return f.read(512)
            at += len(chunk)
    return None


def _header_problem(block: bytes) -> str:
    """Why tarfile cannot read a member header (its own words: bad checksum, invalid header...)."""
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except tarfile.TarError as e:
        return str(e) or type(e).__name__
    return "its member does not fit the tar"


def _take_member(url: str, sample: dict, ext: str, data: bytes, member: tarfile.TarInfo) -> None:
    """Add one tar member to its sample: the class of a .cls member, the place and size of an image."""
    from PIL import Image

    key = sample["key"]
    if ext == "cls":
        try:
            sample["label"] = int(data.decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise UserError(f"shard {url}: sample {key}: {key}.cls holds {data[:20]!r}, not a class number") from None
        return
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Exception as e:
        raise UserError(
            f"shard {url}: sample {key}: cannot read its image {key}.{ext} ({e}); replace or remove the sample"
        ) from None
    sample.update(ext=ext, offset=member.offset_data, length=member.size, hw=(h, w))


def _stamp(url: str) -> tuple[int, str]:
    """(size, modification stamp) of a shard; a missing shard is one clear line."""
    fs, path = _file_system(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise UserError(
            f"shard {url} does not exist: check the wds pattern (every shard it names must exist)"
        ) from None
    if info.get("type") == "directory":
        raise UserError(f"{url} is a directory, not a tar shard: the wds pattern must name .tar files")
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return int(info["size"]), str(stamp)


def shard_index(url: str) -> ShardIndex:
    """The index of one shard, from the cache when the shard has not changed since it was made."""
    size, stamp = _stamp(url)
    digest = hashlib.sha256(json.dumps([INDEX_VERSION, url, size, stamp]).encode()).hexdigest()[:32]
    cached = index_cache_dir() / f"{digest}.json"
    try:
        return ShardIndex.from_json(json.loads(cached.read_text()))
    except (OSError, ValueError, KeyError):
        pass
    index = scan_shard(url)
    try:  # a cache that cannot be written only costs the next open a scan
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index.to_json()))
        os.replace(tmp, cached)
    except OSError as e:
        log.debug("cannot cache the index of %s in %s: %s", url, cached, e)
    return index


def manifest_classes(urls: list[str], names: list[str]) -> list[str] | None:
    """Class names from the ``manifest.json`` that ``pipeline prepare`` writes beside its shards, when there is one
    and it lists every shard of the pattern (else None: the classes are numbers)."""
    folders = {url.rsplit("/", 1)[0] if "/" in url else "." for url in urls}
    if len(folders) != 1:
        return None
    url = f"{folders.pop()}/{MANIFEST}"
    try:
        fs, path = _file_system(url)
        manifest = json.loads(fs.cat_file(path))
        listed = {s["name"] for s in manifest["shards"]}
        classes = [str(c) for c in manifest["classes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no manifest (or not one of prepared shards): nothing to name the classes with
    return classes if set(names) <= listed else None


class WdsDataset(ImageDataset):
    """Samples of webdataset tar shards (see the module docstring)."""

    sequential = True

    def __init__(self, pattern: str):
        self.pattern, self.source = pattern, f"wds:{pattern}"
        self.urls = expand(pattern)
        if not self.urls:
            raise UserError(
                f"wds pattern '{pattern}' matches no shard: check the path or URL (a brace pattern such as train-{{0000..0099}}.tar, or a glob)"
            )
        with ThreadPoolExecutor(max_workers=min(8, len(self.urls))) as pool:
            shards = list(pool.map(shard_index, self.urls))
        self.names = [url.rstrip("/").rsplit("/", 1)[-1] for url in self.urls]
        self.counts = np.asarray([len(s.keys) for s in shards], np.int64)
        if not self.counts.sum():
            raise UserError(
                f"wds pattern '{pattern}' names {len(self.urls)} shard(s) with no samples in them (KEY.jpg plus KEY.cls)"
            )
        self.keys = [f"{name}/{key}" for name, s in zip(self.names, shards) for key in s.keys]
        self.labels = np.concatenate([s.labels for s in shards])
        self.shard = np.repeat(np.arange(len(shards)), self.counts)  # (N,) the shard of each sample
        self.ext = [e for s in shards for e in s.ext]
        self.offset = np.concatenate([s.offset for s in shards])
        self.length = np.concatenate([s.length for s in shards])
        self._sizes = np.concatenate([s.hw for s in shards])
        found = int(self.labels.max()) + 1
        if (
            found > MAX_CLASSES or self.labels.min() < 0
        ):  # a damaged .cls (or cached index) would size a list of billions of names
            j = int(np.argmax(self.labels)) if found > MAX_CLASSES else int(np.argmin(self.labels))
            raise UserError(
                f"{self.keys[j]} has class {self.labels[j]}: classes are numbers from 0 to {MAX_CLASSES - 1:,}; fix its .cls member"
            )
        named = manifest_classes(self.urls, self.names)  # shards made by `pipeline prepare` carry their class names
        if named is not None and len(named) < found:
            named = None  # fewer names than the labels need: numbers instead
        self.classes = named or [
            str(c) for c in range(found)
        ]  # validation shards are checked against the training classes (``check_classes``)
        self._fs = None

    def __getstate__(self):
        return {**self.__dict__, "_fs": None}  # file systems are opened again in each process

    def _read(self, shard: int, start: int, end: int) -> bytes:
        if self._fs is None:
            self._fs = {}
        url = self.urls[shard]
        if url not in self._fs:
            self._fs[url] = _file_system(url)
        fs, path = self._fs[url]
        try:
            return fs.cat_file(path, start=int(start), end=int(end))
        except FileNotFoundError:
            raise UserError(f"shard {url} is gone: the dataset changed since it was opened") from None

    def fingerprint(self) -> str:
        h = hashlib.sha256(super().fingerprint().encode())
        h.update(json.dumps([self.names, self.counts.tolist()]).encode())
        return h.hexdigest()[:32]

    def sizes(self) -> np.ndarray:
        return self._sizes

    def encoded(self, ids) -> np.ndarray:
        """The images of ``ids`` as bytes, one ranged read per run of neighbouring members of a shard."""
        ids = np.asarray(ids, np.int64)
        out = np.empty(len(ids), object)
        if not len(ids):
            return out
        order = np.argsort(ids, kind="stable")
        s = ids[order]
        start, end = self.offset[s], self.offset[s] + self.length[s]
        new_run = np.r_[
            True, (self.shard[s][1:] != self.shard[s][:-1]) | (start[1:] - end[:-1] > GAP) | (start[1:] < start[:-1])
        ]
        bounds = np.r_[np.flatnonzero(new_run), len(s)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            first = int(start[lo])
            blob = self._read(int(self.shard[s[lo]]), first, int(end[lo:hi].max()))
            for k in range(lo, hi):
                out[order[k]] = blob[start[k] - first : end[k] - first]
        return out

    def decode(self, i: int, data: bytes) -> torch.Tensor:
        key = self.keys[i].split("/", 1)[1]
        try:
            return decode_image(data, f"shard {self.urls[self.shard[i]]}: sample {key}")
        except Exception as e:
            raise UserError(
                f"shard {self.urls[self.shard[i]]}: sample {key}: cannot decode its image {key}.{self.ext[i]} ({e}); replace or remove the sample"
            ) from None

    def image(self, i: int) -> torch.Tensor:
        return self.decode(i, self.encoded([i])[0])

    def order_note(self) -> str | None:
        """One line when the samples are in class order (blocks then hold few classes), else None."""
        labels = self.labels
        same = class_order(labels)
        if same is None:
            return None
        shares = [np.bincount(labels[self.shard == k]).max() / c if c else 0.0 for k, c in enumerate(self.counts)]
        k = int(np.argmax(shares))
        return (
            f"{self.source}: the samples are in class order ({same:.0%} of neighbouring samples share a class; the commonest class of "
            f"shard {self.names[k]} is {shares[k]:.0%} of it): blocks follow the shards, so batches and mixing partners will mostly share a class; "
            "shuffle the samples when writing the shards"
        )


def class_order(labels: np.ndarray) -> float | None:
    """The share of neighbouring samples with the same class when it says the samples are in class order (over half,
    and three times what a shuffle gives: about sum(p_c^2)), else None."""
    if len(labels) < 8 or np.count_nonzero(np.bincount(labels)) < 2:
        return None
    same = float(np.mean(labels[1:] == labels[:-1]))
    expected = float(np.sum((np.bincount(labels) / len(labels)) ** 2))
    return None if same < 0.5 or same < 3 * expected else same
