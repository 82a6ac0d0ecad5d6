"""Names that become paths or object keys (teacher ids, stats groups): plain names only.

A store at a URL shares its bucket with other data, and a store on disk its
file system: ``teachers/<id>`` must stay inside the store. So an id is one
path component of letters, digits, ``_``, ``-`` and ``.``, starting with a
letter, digit or ``_`` (never ``..``, a hidden file, or something that reads
as a flag), at most 128 characters.
"""

from __future__ import annotations

import re

from .errors import UserError

_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_name(name: str, what: str = "name") -> str:
    """``name`` when it is a plain name, else a ``UserError`` saying what a name may hold."""
    if not isinstance(name, str) or not _PLAIN.fullmatch(name):
        raise UserError(
            f"{what} {name!r} is not a plain name: use letters, digits, '_', '-' and '.' "
            "(at most 128, starting with a letter, digit or '_'; no '/', '\\' or '..')"
        )
    return name
