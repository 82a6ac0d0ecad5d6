"""A run's own files: its log (run.log, or a store's logs/), its config.yaml, written only once its set-up passed."""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

from storage import Location, UserError
from storage.errors import Unreachable
from storage.lock import WriterLock

from pipeline.settings import config


LOCK_FILE = "run.lock"
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class _ToRunLogs(logging.Handler):
    """A library's log lines (Ray's token-authentication notice, ...) go where library warnings go: to the run log,
    not the console (README). Held while no run log is open (a sweep joins Ray before its sweep.log exists); the
    next run log to open starts with them."""

    HOLD = 200  # lines at most: a library that talks more before any run log opens loses its oldest

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        # The root's handlers but its console (a plain StreamHandler): run logs, and a run's lines held until it starts.
        targets = [h for h in logging.getLogger().handlers if type(h) is not logging.StreamHandler]
        if not any(isinstance(h, logging.FileHandler) for h in targets):
            self.held = [*self.held, record][-self.HOLD :]
        for handler in targets:
            if record.levelno >= handler.level:
                handler.handle(record)

    def replay(self, handler: logging.Handler) -> None:
        for record in self.held:
            handler.handle(record)
        self.held = []


LIBRARY_LINES = _ToRunLogs()


def library_logs_to_run_log(name: str) -> None:
    """Send logger ``name``'s lines to the run log only: its own handlers (Ray adds a stderr one) are removed."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(LIBRARY_LINES)
    logger.propagate = False  # the root's console would print them


@contextmanager
def run_log(path: Path | Location):
    """Also write this run's log lines to ``path``; a log for an object store is uploaded at the end."""
    local = path if isinstance(path, Path) else Path(path.path) if path.is_local else None
    if isinstance(path, Location):
        path.refuse_links()  # a store's logs/ that links elsewhere would carry the log out of the store
    tmp = None
    if local is None:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
        local = Path(tmp.name)
    local.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(local)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    LIBRARY_LINES.replay(handler)  # what a library said before this log opened (Ray, joined first)
    logging.getLogger().addHandler(handler)
    unreachable = False
    try:
        yield
    except Unreachable:
        unreachable = True  # the upload would wait for the same silence: the log stays on this machine
        raise
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
        if tmp is not None and not unreachable:
            path.write_bytes(local.read_bytes())
            local.unlink()


class RunFiles:
    """A training run's ``config.yaml`` and ``run.log`` in OUT, written only once the run has passed its set-up.

    A run refused at set-up (a bad setting, a student or a method that cannot be built, a cluster that
    cannot be reached) leaves OUT as it was, so a folder of an earlier run keeps files that agree with
    each other. Log lines from before ``start()`` are held and go to run.log when it opens; config.yaml
    is replaced through a rename, never left half-written.
    """

    def __init__(self, out: Path, record: dict, lock: bool = True, weights_name: str = "student.safetensors"):
        self.out, self.record, self.weights_name = out, record, weights_name
        # A sweep's trials skip it: the sweep holds its folder, and a trial may be resumed on another node.
        self.lock = WriterLock(Location(str(out / LOCK_FILE)), f"run folder {out}", busy="is in use") if lock else None
        self.held = _HeldLines()
        self.file: logging.Handler | None = None

    def __enter__(self) -> "RunFiles":
        logging.getLogger().addHandler(self.held)
        return self

    def start(self) -> None:
        """The run begins: take the folder's lock (a second run into it is refused), write config.yaml, open run.log."""
        if self.file is not None:
            return
        # The folder becomes a timm model folder, which loads one set of weights: another kind of run's would win.
        other = [name for name in MODEL_FILES if name != self.weights_name and (self.out / name).is_file()]
        if other:
            raise UserError(
                f"--out {self.out} holds another run's model ({other[0]}): timm would load that one from the folder; pass a new --out"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        if self.lock is not None:
            self.lock.acquire()
        config.save(self.out / "config.yaml", self.record)
        self.file = logging.FileHandler(self.out / "run.log")
        self.file.setFormatter(logging.Formatter(LOG_FORMAT))
        LIBRARY_LINES.replay(self.file)
        for record in self.held.records:
            self.file.handle(record)
        root = logging.getLogger()
        root.removeHandler(self.held)
        root.addHandler(self.file)

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.lock.release()  # only removes the lock file this run holds
        root = logging.getLogger()
        root.removeHandler(self.held)
        if self.file is not None:
            root.removeHandler(self.file)
            self.file.close()


class _HeldLines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# what distill and train write: one timm model folder holds one
MODEL_FILES = ("student.safetensors", "model.safetensors")


def check_out(out: Path) -> Path:
    """--out: a run directory that exists, or one that can be made (its nearest existing parent is a directory)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: pass a new or an existing run directory")
    blocked = file_above(out)
    if blocked:
        raise UserError(f"--out {out} cannot be made: {blocked} is a file, not a directory")
    return out


def file_above(path: Path) -> Path | None:
    """The nearest existing parent of ``path`` when it is a file (so ``path`` cannot be made), else None."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return None if parent.is_dir() else parent
