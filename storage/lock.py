"""One writer at a time: a lock file beside a teacher's arrays (one extraction per teacher), or in a run's folder.

Two writers of the same teacher would both compute every pending unit (the
commit protocol keeps the store right, but half the work is wasted), so the
second one refuses while the first holds the lock. A holder that died leaves
its file behind: on the same host a dead process id frees it at once; from
another host a heartbeat older than ``STALE_SECONDS`` does.

On a local disk the file is created with O_EXCL, which is atomic. Object
stores offer no portable create-if-absent, so there the lock is written and
read back: two writers starting within the same moment may both win, which
costs duplicated work, never a wrong store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid

from .errors import Unreachable, UserError
from .location import Location

STALE_SECONDS = 600.0  # a holder refreshes every minute while it works
REFRESH_SECONDS = 60.0
_TEMP_FILE = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # Location.write_bytes: .NAME.XXXXXXXX.tmp

log = logging.getLogger(__name__)


class WriterLock:
    """One writer of a folder at a time (a teacher's arrays, a run's folder); ``busy`` says what the holder does.

    ``tidy``: the store, whose leftover temporary files (a writer killed between write and rename) the new holder removes:
    every one in the locked teacher's own folder (nobody else writes there), elsewhere those older than a minute."""

    def __init__(self, location: Location, what: str, tidy: Location | None = None, busy: str = "is being extracted"):
        self.location, self.what, self.tidy, self.busy = location, what, tidy, busy
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "started": self.started,
            "heartbeat": time.time(),
        }

    def acquire(self) -> "WriterLock":
        for _ in range(2):  # a stale lock is removed once, then taken
            if self._try_create():
                threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True).start()
                if self.tidy is not None and self.tidy.is_local:  # object-store writes leave no temporary files
                    remove_stale_temp_files(Location(self.location.parent_path), older_than=0.0)
                    remove_stale_temp_files(self.tidy, older_than=60.0)
                return self
            holder = self._holder()
            if holder is None or self._is_stale(holder):
                self.location.remove()
                continue
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
            raise UserError(
                f"{self.what} {self.busy} by process {holder.get('pid')} on {holder.get('host')} since {since} "
                f"(lock {self.location}): wait for it to finish, or delete the lock file if that run is gone"
            )
        raise UserError(f"could not take the lock {self.location}: another process keeps taking it; try again")

    def _try_create(self) -> bool:
        data = json.dumps(self._record()).encode()
        if self.location.is_local:
            os.makedirs(self.location.parent_path, exist_ok=True)
            try:
                fd = os.open(self.location.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.location.exists():
            return False
        self.location.write_bytes(data)
        holder = self._holder()
        return holder is not None and holder.get("token") == self.token

    def _holder(self) -> dict | None:
        try:
            return self.location.read_json()
        except (FileNotFoundError, ValueError):
            return None  # gone, or torn by a crash mid-write: nobody holds it

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder.get("pid", -1)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError):
                pass
            return False
        return time.time() - float(holder.get("heartbeat", 0)) > STALE_SECONDS

    def _heartbeat(self) -> None:
        # Other hosts cannot see our process, only this timestamp.
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                self.location.write_json(self._record())
            except Exception as e:  # a missed beat is harmless unless it lasts STALE_SECONDS
                log.warning("could not refresh the lock %s: %s", self.location, e)

    def release(self) -> None:
        self._stop.set()
        holder = self._holder()
        if holder is not None and holder.get("token") == self.token:
            self.location.remove()

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, kind, error, tb) -> None:
        if isinstance(error, Unreachable):  # the release would wait for the same silence; the lock goes stale instead
            self._stop.set()
            return
        self.release()


def remove_stale_temp_files(root: Location, older_than: float) -> int:
    """Remove ``.NAME.XXXXXXXX.tmp`` files that ``Location.write_bytes`` left when killed before its rename.

    Only local stores have them (object-store writes are single PUTs). A temporary file lives for
    milliseconds, so one older than ``older_than`` seconds belongs to no running writer.
    """
    if not os.path.isdir(root.path):
        return 0
    removed, now = 0, time.time()
    for folder, _, files in os.walk(root.path):
        for name in files:
            path = os.path.join(folder, name)
            if _TEMP_FILE.fullmatch(name) and now - os.path.getmtime(path) > older_than:
                os.remove(path)
                removed += 1
    if removed:
        log.info("removed %d temporary file(s) left by killed writers under %s", removed, root)
    return removed
