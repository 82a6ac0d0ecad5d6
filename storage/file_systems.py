"""The file systems a store may live on: which URL schemes are allowed, the options and time limits each is opened
with, and a remote store's silence or broken connection turned into one line (``answering``).

Kept apart from ``Location`` because readers of shards and prepared folders open the same file systems with the
same limits without being a store's location.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import fsspec

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


def bound_retries(fs) -> None:
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
