"""Where a store lives: a local directory or any fsspec URL (``s3://bucket/path``, ``file://...``).

A ``Location`` is a path on one file system. The store asks it for the few
things it needs (small whole-file reads and writes, listings, removal, a zarr
store rooted there) and never touches ``os`` or ``open`` itself, so the same
code writes to a laptop disk and to an S3 bucket.

Object stores make each PUT atomic, so a small file written in one call is
seen either whole or not at all; on a local disk the same guarantee comes
from writing a temporary file and renaming it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import stat
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore

from .errors import Unreachable, UserError


# An unreachable endpoint should fail in seconds, not after botocore's default minute of retries, and one that
# stops answering mid-request (a paused or hung server: the connection stands, no byte comes) after READ_SECONDS
# of silence, not botocore's 60. Botocore's "standard" mode tries each request twice (timeouts, throttling, 5xx);
# s3fs's own retry loop around it is set to one pass, or the two would multiply. One silent request then fails
# within about 2 x 3 s + backoff (< 1 s); zarr's opening of an array waits on two in a row (zarr.json, then the
# v2 names), about 14 s: within README's 20 (measured: tests/flows/test_object_store.py, a paused server).
READ_SECONDS = 3
ATTEMPTS = 2
STORAGE_OPTIONS = {
    "s3": {
        "config_kwargs": {
            "connect_timeout": 5,
            "read_timeout": READ_SECONDS,
            "retries": {"max_attempts": ATTEMPTS, "mode": "standard"},
        }
    }
}
S3FS_RETRIES = 1  # s3fs's loop (a class attribute, no option): one pass

# The URL schemes a store may live at, with the package that implements each. Anything else (ftp, http,
# ssh, a typo) is refused before any connection: http is read-only and cannot list, ftp and ssh connect
# when a location is merely named.
SCHEMES = {
    "file": None,
    "local": None,
    "memory": None,
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
}
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}  # a bucket (container) first, then keys
REACH_SECONDS = 20.0  # any file system must answer within this; S3's own timeouts (above) answer sooner


def storage_options(url: str) -> dict:
    return STORAGE_OPTIONS.get(fsspec.utils.get_protocol(url), {})


def check_url(url: str) -> str:
    """``url`` when it names a directory, or a URL of a known scheme whose file system is installed."""
    if "://" not in url and "::" not in url:
        return url  # a local path
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if "::" in url or scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES if s not in ("local", "s3a", "gcs", "abfs", "abfss"))
        raise UserError(f"unknown URL scheme in {url}: a store is a directory or a URL of {known}")
    package = SCHEMES[scheme]
    if package is not None:
        try:
            fsspec.get_filesystem_class(scheme)
        except ImportError:
            raise UserError(
                f"{url} needs the {package} package, which is not installed: pip install {package}"
            ) from None
    if scheme in OBJECT_STORES:
        bucket = url.split("://", 1)[1].split("/", 1)[0]
        if scheme in ("s3", "s3a") and not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise UserError(
                f"'{bucket}' in {url} is not a valid S3 bucket name: 3 to 63 lower-case letters, digits, '.' and '-'"
            )
        if not bucket:
            raise UserError(f"{url} names no bucket: use {scheme}://BUCKET/PATH")
    return url


def _bound_retries(fs) -> None:
    if type(fs).__name__ == "S3FileSystem":
        fs.retries = S3FS_RETRIES


def network_error(e: BaseException) -> bool:
    """Whether ``e`` says a server did not answer or the connection failed (not: it answered no)."""
    if isinstance(e, (TimeoutError, ConnectionError)):
        return True
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
    except ImportError:
        return False
    return isinstance(e, (HTTPClientError, BotoConnectionError))


@contextmanager
def answering(url: str):
    """Turn a remote store's silence or broken connection (after its own time limits and retries) into one line."""
    try:
        yield
    except UserError:
        raise
    except NotADirectoryError as e:  # a local path through a file: one line, whichever command meets it
        raise UserError(
            f"cannot write under {url}: {e.filename or url} runs through a file, not a folder; choose another location"
        ) from None
    except Exception as e:
        if "://" not in url or not network_error(e):  # a local path's errors say what they are themselves
            raise
        words = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Unreachable(
            f"{url} stopped answering ({words}): the server did not reply within {READ_SECONDS} s in {ATTEMPTS} attempts; "
            "check the endpoint and network, then run the same command again (committed work is kept)"
        ) from e


def _within(seconds: float, fn, what: str):
    """``fn()``, or a UserError when it has not answered within ``seconds`` (a hung mount, an endpoint that never replies)."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=run, daemon=True, name="reach")
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise UserError(
            f"cannot reach {what}: no answer within {seconds:.0f} s; check the URL, network and credentials"
        )
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _answers(method):
    """A Location method whose remote silence or broken connection is one line (``answering``)."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        with answering(self.url):
            return method(self, *args, **kwargs)

    return wrapped


class Location:
    """One directory (or object prefix) on an fsspec file system."""

    def __init__(self, url: str | os.PathLike, *, _fs=None, _path: str | None = None, _root: str | None = None):
        if _fs is None:
            url = check_url(os.fspath(url))
            _fs, _path = fsspec.core.url_to_fs(url, **storage_options(url))
            _bound_retries(_fs)
        self.fs, self.path = _fs, _path.rstrip("/") or "/"
        self.url = url if isinstance(url, str) else os.fspath(url)
        # The location first named (a store's root): the tree below it is the tool's own, and a symbolic link in it
        # would carry writes out of it (see ``refuse_links``). The root itself may be a link: the user named it.
        self.root = _root or self.path

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def __truediv__(self, name: str) -> "Location":
        return Location(f"{self.url.rstrip('/')}/{name}", _fs=self.fs, _path=f"{self.path}/{name}", _root=self.root)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    # -- files ----------------------------------------------------------------------------
    @_answers
    def exists(self) -> bool:
        self.fs.invalidate_cache(self.path)  # s3fs caches listings; another writer may have changed them
        return self.fs.exists(self.path)

    @property
    def bucket(self) -> str | None:
        """The bucket (container) of an object-store location; None on other file systems."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return self.path.lstrip("/").split("/", 1)[0] if protocol in OBJECT_STORES else None

    def reach(self, seconds: float = REACH_SECONDS) -> bool:
        """``exists()``, after checking that the file system answers within ``seconds`` and that its bucket exists.

        Any failure is one UserError naming the location: an endpoint that is down or answers 404, a
        missing bucket, refused credentials, a mount that hangs.
        """

        def probe() -> bool:
            if self.bucket is not None:
                self.fs.invalidate_cache(self.bucket)
                try:
                    self.fs.info(self.bucket)  # unlike exists(), says why: no answer, refused credentials, no bucket
                except FileNotFoundError:
                    raise UserError(
                        f"bucket {self.bucket} of {self.url} does not exist or these credentials cannot see it: "
                        "create it first, or check the URL, the endpoint (AWS_ENDPOINT_URL) and the credentials"
                    ) from None
            try:
                return self.exists()
            except (FileNotFoundError, NotADirectoryError):
                return False

        try:
            return _within(seconds, probe, self.url)
        except UserError:
            raise
        except Exception as e:  # network, credentials, DNS: the library's own words say which
            words = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise UserError(
                f"cannot reach {self.url}: {type(e).__name__}: {words}; check the URL, network and credentials"
            ) from e

    @_answers
    def read_bytes(self) -> bytes:
        if self.is_local:
            check_regular(self.path, allow_dir=False)
        return self.fs.cat_file(self.path)

    @_answers
    def write_bytes(self, data: bytes) -> None:
        """Replace the file whole: readers see the old content or the new, never a part."""
        if not self.is_local:
            self.fs.pipe_file(self.path, data)  # one PUT: atomic on object stores
            return
        self.refuse_links()
        self.fs.makedirs(self.parent_path, exist_ok=True)
        tmp = f"{self.parent_path}/.{self.name}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def read_json(self):
        return json.loads(self.read_bytes())

    def write_json(self, obj) -> None:
        self.write_bytes(json.dumps(obj, indent=1, sort_keys=True).encode())

    @property
    def parent_path(self) -> str:
        return self.path.rsplit("/", 1)[0] or "/"

    @_answers
    def remove(self) -> None:
        """Delete this file if it exists; a directory standing where the file should be is refused, not deleted."""
        if self.is_local and os.path.isdir(self.path):
            raise UserError(
                f"{self.path} is a directory where a file of the store should be: move it away, then run the same command again"
            )
        self.refuse_links()
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    @_answers
    def remove_tree(self) -> None:
        self.refuse_links(itself=True)
        if self.exists():
            self.fs.rm(self.path, recursive=True)

    # -- directories ------------------------------------------------------------------------
    @_answers
    def makedirs(self) -> None:
        # Object stores have no directories: nothing to make (s3fs would create a missing bucket).
        if self.bucket is None:
            self.refuse_links(itself=True)
            self.fs.makedirs(self.path, exist_ok=True)

    @_answers
    def listdir(self) -> list[str]:
        """Names directly under this location; empty when there is nothing."""
        self.fs.invalidate_cache(self.path)
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != self.path)

    @_answers
    def file_sizes(self) -> dict[str, int]:
        """Every file under this location, by path relative to it, with its size in bytes (one listing)."""
        self.fs.invalidate_cache(self.path)
        try:
            found = self.fs.find(self.path, detail=True)
        except FileNotFoundError:
            return {}
        root = self.path.rstrip("/") + "/"
        return {p[len(root) :] if p.startswith(root) else p: int(e["size"]) for p, e in found.items()}

    @_answers
    def size(self) -> int:
        """Bytes under this location (a file's size, or a directory's total)."""
        return self.fs.du(self.path, total=True) if self.exists() else 0

    def refuse_links(self, itself: bool = False) -> None:
        """Refuse to write here when a directory between the root and this location (``itself``: or this location,
        a directory about to be made or removed) is a symbolic link; local only, object stores have no links."""
        if self.is_local:
            refuse_links(self.root, self.path if itself else self.parent_path)

    def links(self) -> list[tuple[str, str]]:
        """Every symbolic link under this location, with its target: (link, target); none on object stores."""
        if not self.is_local or not os.path.isdir(self.path):
            return []
        found = []
        for top, dirs, files in os.walk(self.path):  # never follows a link: a linked directory is listed, not entered
            for name in sorted(dirs + files):
                full = os.path.join(top, name)
                if os.path.islink(full):
                    found.append((full, os.readlink(full)))
        return sorted(found)

    # -- zarr -------------------------------------------------------------------------------
    def zarr_store(self, read_only: bool = False):
        if self.is_local:
            return RegularFilesStore(self.path, read_only=read_only, links_from=self.root)
        store = FsspecStore.from_url(self.url, storage_options=storage_options(self.url), read_only=read_only)
        _bound_retries(store.fs)
        return store

    @_answers
    def open_group(self, mode: str = "a") -> zarr.Group:
        return zarr.open_group(self.zarr_store(read_only=mode == "r"), mode=mode)


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A temporary file beside local ``path`` to write in the block; it then replaces ``path`` in one rename.

    Readers see the old file or the new one, never a part; a write that fails leaves no temporary file.
    For files one writer owns (run files, checkpoints, weights); ``Location.write_bytes`` is the store's own.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def refuse_links(root: str, directory: str) -> None:
    """One line naming the first symbolic link among the directories below ``root`` down to ``directory``.

    A store (or a run folder) is a tree the tool owns: a linked ``logs`` folder or shard folder would carry
    its writes (and removals) to another place, which nothing the user asked for names.
    """
    root, directory = os.path.normpath(root), os.path.normpath(directory)
    if directory == root or not directory.startswith(root.rstrip(os.sep) + os.sep):
        return
    path = root
    for part in os.path.relpath(directory, root).split(os.sep):
        path = os.path.join(path, part)
        if os.path.islink(path):
            raise UserError(
                f"{path} is a symbolic link inside the store (to {os.readlink(path)}): the store's files are written only inside it; "
                "replace the link with a real directory (or move the store), then run the same command again"
            )


def check_regular(path: str, allow_dir: bool = True) -> None:
    """Refuse to read anything but a regular file: a FIFO where a shard should be would block its reader forever.

    ``allow_dir``: a directory passes (zarr reads one as a missing chunk).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the reader's own error says so
    if not stat.S_ISREG(mode) and not (allow_dir and stat.S_ISDIR(mode)):
        raise UserError(
            f"{path} is not a regular file (a pipe, a device or a directory stands where a file of the store should be): "
            "move it away, then run the same command again (`pipeline verify` lists what is missing)"
        )


class RegularFilesStore(LocalStore):
    """zarr's LocalStore, reading regular files only (see ``check_regular``); directories read as missing, as in zarr.

    Writes and deletes refuse to go through a symbolic link below ``links_from`` (the store's root, see ``refuse_links``).
    """

    def __init__(self, root, *, read_only: bool = False, links_from: str | None = None):
        super().__init__(root, read_only=read_only)
        self.links_from = links_from or str(root)

    def with_read_only(self, read_only: bool = False):
        return type(self)(self.root, read_only=read_only, links_from=self.links_from)

    async def _set(self, key, value, exclusive: bool = False):
        refuse_links(self.links_from, os.path.dirname(os.path.join(self.root, key)))
        return await super()._set(key, value, exclusive=exclusive)

    async def delete(self, key):
        refuse_links(self.links_from, os.path.join(self.root, key))
        return await super().delete(key)

    async def delete_dir(self, prefix):
        refuse_links(self.links_from, os.path.join(self.root, prefix))
        return await super().delete_dir(prefix)

    async def get(self, key, prototype=None, byte_range=None):
        check_regular(os.path.join(self.root, key))
        return await super().get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        for key, _ in key_ranges:
            check_regular(os.path.join(self.root, key))
        return await super().get_partial_values(prototype, key_ranges)
