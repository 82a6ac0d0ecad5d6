"""A griffe extension for the API pages: the project's docstrings title their examples ``Example:`` (STYLE.md, item 16),
which griffe's Google parser reads as an admonition of prose; read as ``Examples:``, their ``>>>`` lines render as code."""

from __future__ import annotations

import re

from griffe import Extension

_TITLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _TITLE.sub(r"\1Examples:", obj.docstring.value)
