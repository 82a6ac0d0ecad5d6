"""The one exception type a user is meant to read.

Anything raised as ``UserError`` is shown by the command line as a single line
(what is wrong, what to do) with a non-zero exit; everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A mistake in input or environment that the user can fix."""
