"""Local files a tool owns: written whole through a rename, never through a symbolic link out of their tree, and
read only when they are regular files (a FIFO where a shard should be would block its reader forever).

``RegularFilesStore`` is zarr's local store with both guards, what a local ``Location`` opens its arrays through.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from zarr.storage import LocalStore

from .errors import UserError


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
