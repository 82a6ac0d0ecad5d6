"""One registry of named things of one kind: store backends here, and above this floor the methods, the data
sources and the teachers. Each name is registered once: a second, different thing under a name that is taken
is a programming error (two modules claiming ``kd``), raised at import, never a silent overwrite."""

from __future__ import annotations


class Registry(dict):
    """A dict from name to thing whose ``add`` refuses a name taken by another thing (the same one again is fine:
    a module imported twice)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, name: str, item):
        if name in self and self[name] != item:
            raise ValueError(f"{self.kind} '{name}' is registered twice ({self[name]!r}, then {item!r})")
        self[name] = item
        return item
