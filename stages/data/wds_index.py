"""The index of webdataset tar shards: every sample's key, label, image size and byte range, found in one streaming
pass over a shard and cached locally.

A sample is a run of members sharing a key (webdataset's convention, what timm's ImageNet shards hold): one image
``KEY.jpg|jpeg|png|webp`` and its class ``KEY.cls`` (a decimal integer); other members (``KEY.json``...) are
ignored. The scan reads only what it must (headers, class members and the image headers inside the stream); the
result is kept in a local cache keyed by the shard's URL, size and modification stamp (an ETag on S3), so later
opens read no image data. A tar reader stops at the first member header it cannot read as if the tar ended there,
so the scan compares where its walk stopped with the file's size: only zero blocks (the end marker, the record
padding) may follow, else the shard is damaged (one line, never a shorter shard).

Kept apart from ``WdsDataset`` (``stages.data.wds_dataset``), which reads images through the index, because
``pipeline prepare`` (``stages.data.prepare``) writes and counts shards by the same conventions.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage import UserError
from storage.file_systems import storage_options

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MANIFEST = "manifest.json"  # what `pipeline prepare` writes beside its shards (``stages.data.prepare``)
INDEX_VERSION = 2  # 2: a shard with a damaged member header is refused (version 1 indexed it as a shorter one)


def index_cache_dir() -> Path:
    """Where shard indexes are cached: the user's cache directory (``XDG_CACHE_HOME``, else ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "teacher-cache-pipeline" / "wds-index"


def file_system(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url, **storage_options(url))


def expand(pattern: str) -> list[str]:
    """The shard URLs of a brace pattern or glob, in the pattern's order (globs sorted)."""
    import braceexpand

    urls = []
    for url in braceexpand.braceexpand(pattern):
        if any(c in url for c in "*?["):
            fs, path = file_system(url)
            urls += sorted(fs.unstrip_protocol(p) if "://" in url else p for p in fs.glob(path))
        else:
            urls.append(url)
    return urls


def split_key(name: str) -> tuple[str | None, str | None]:
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
    fs, path = file_system(url)
    walk = _Walk(url)
    try:
        with fs.open(path, "rb", block_size=8 << 20) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            failed = walk.members(tar)
            # Where the walk stopped: the end marker of a whole tar, else the header it could not read.
            key = walk.current["key"] if walk.current else None
            _check_end(url, fs, path, tar.offset, failed, key, walk.last, len(walk.seen))
            walk.finish()
    except (tarfile.TarError, EOFError) as e:  # the first header
        raise UserError(f"cannot read shard {url}: {e}; the tar file is damaged or not a tar: write it again") from None
    except FileNotFoundError:
        raise UserError(f"shard {url} does not exist: check the wds pattern") from None
    samples = walk.samples
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


class _Walk:
    """One pass over a shard's members: samples gathered as their members go by (neighbours in the tar)."""

    def __init__(self, url: str):
        self.url, self.samples, self.seen = url, [], set()
        self.current: dict | None = None  # the sample whose members are being read
        self.last: str | None = None  # the last member's name

    def members(self, tar) -> Exception | None:
        """Read every member; the error of a header that cannot be read after the first (a GNU long name's...)."""
        try:
            for member in tar:
                self.last = member.name
                key, ext = split_key(member.name)
                if not member.isfile() or key is None or (ext not in IMAGE_EXTENSIONS and ext != "cls"):
                    continue
                if self.current is None or self.current["key"] != key:
                    self.finish()
                    if key in self.seen:
                        raise UserError(
                            f"shard {self.url}: sample {key} appears twice, apart: a sample's members must be neighbours in the tar"
                        )
                    self.seen.add(key)
                    self.current = {"key": key}
                _take_member(self.url, self.current, ext, tar.extractfile(member).read(), member)
        except (tarfile.TarError, EOFError) as e:
            return e
        return None

    def finish(self) -> None:
        """The sample read so far is whole: it has an image and a class."""
        sample, self.current = self.current, None
        if sample is None:
            return
        if "offset" not in sample:
            raise UserError(
                f"shard {self.url}: sample {sample['key']} has no image ({', '.join('.' + e for e in IMAGE_EXTENSIONS)}): add it or remove the sample's members"
            )
        if "label" not in sample:
            raise UserError(
                f"shard {self.url}: sample {sample['key']} has no .cls member (its class): wds datasets need KEY.cls beside each image "
                "(webdataset's and timm's convention); write the shards with labels"
            )
        self.samples.append(sample)


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
    fs, path = file_system(url)
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
        fs, path = file_system(url)
        manifest = json.loads(fs.cat_file(path))
        listed = {s["name"] for s in manifest["shards"]}
        classes = [str(c) for c in manifest["classes"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no manifest (or not one of prepared shards): nothing to name the classes with
    return classes if set(names) <= listed else None
