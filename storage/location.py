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
import threading
import uuid

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore

from .errors import UserError
from .file_systems import OBJECT_STORES, REACH_SECONDS, answering, bound_retries, check_url, storage_options
from .local_files import RegularFilesStore, check_regular, refuse_links


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
            bound_retries(_fs)
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
        bound_retries(store.fs)
        return store

    @_answers
    def open_group(self, mode: str = "a") -> zarr.Group:
        return zarr.open_group(self.zarr_store(read_only=mode == "r"), mode=mode)
