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

import json
import os
import uuid

import fsspec
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.storage import FsspecStore, LocalStore


# An unreachable endpoint should fail in seconds, not after botocore's default
# minute of retries; "standard" mode still retries throttling and 5xx answers.
STORAGE_OPTIONS = {"s3": {"config_kwargs": {"connect_timeout": 5, "retries": {"max_attempts": 3, "mode": "standard"}}}}


def storage_options(url: str) -> dict:
    return STORAGE_OPTIONS.get(fsspec.utils.get_protocol(url), {})


class Location:
    """One directory (or object prefix) on an fsspec file system."""

    def __init__(self, url: str | os.PathLike, *, _fs=None, _path: str | None = None):
        if _fs is None:
            url = os.fspath(url)
            _fs, _path = fsspec.core.url_to_fs(url, **storage_options(url))
        self.fs, self.path = _fs, _path.rstrip("/") or "/"
        self.url = url if isinstance(url, str) else os.fspath(url)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def __truediv__(self, name: str) -> "Location":
        return Location(f"{self.url.rstrip('/')}/{name}", _fs=self.fs, _path=f"{self.path}/{name}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    # -- files ----------------------------------------------------------------------------
    def exists(self) -> bool:
        self.fs.invalidate_cache(self.path)  # s3fs caches listings; another writer may have changed them
        return self.fs.exists(self.path)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def write_bytes(self, data: bytes) -> None:
        """Replace the file whole: readers see the old content or the new, never a part."""
        if not self.is_local:
            self.fs.pipe_file(self.path, data)  # one PUT: atomic on object stores
            return
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

    def remove(self) -> None:
        """Delete this file if it exists."""
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    def remove_tree(self) -> None:
        if self.exists():
            self.fs.rm(self.path, recursive=True)

    # -- directories ------------------------------------------------------------------------
    def makedirs(self) -> None:
        # Object stores have no directories; for them this is a no-op.
        self.fs.makedirs(self.path, exist_ok=True)

    def listdir(self) -> list[str]:
        """Names directly under this location; empty when there is nothing."""
        self.fs.invalidate_cache(self.path)
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != self.path)

    def size(self) -> int:
        """Bytes under this location (a file's size, or a directory's total)."""
        return self.fs.du(self.path, total=True) if self.exists() else 0

    # -- zarr -------------------------------------------------------------------------------
    def zarr_store(self, read_only: bool = False):
        if self.is_local:
            return LocalStore(self.path, read_only=read_only)
        return FsspecStore.from_url(self.url, storage_options=storage_options(self.url), read_only=read_only)

    def open_group(self, mode: str = "a") -> zarr.Group:
        return zarr.open_group(self.zarr_store(read_only=mode == "r"), mode=mode)
