"""The one exception type a user is meant to read.

Anything raised as ``UserError`` is shown by the command line as a single line
(what is wrong, what to do) with a non-zero exit; everything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """A mistake in input or environment that the user can fix."""


class Unreachable(UserError):
    """A remote store that stopped answering (timed out, refused, reset): what is left to do there (a lock's
    release, a log's upload) would wait for the same silence again, so it is skipped."""


def remote_user_error(text: str) -> UserError | None:
    """The UserError named in a traceback's text (what a loader worker or a Ray task sends back), if any."""
    if "UserError: " not in text:
        return None
    return UserError(text.rsplit("UserError: ", 1)[-1].strip().splitlines()[0])
