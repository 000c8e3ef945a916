"""The two errors every script turns into one line on stderr (``runtime.launch``).

They live here, below everything else, so that any module can raise them; ``util``
re-exports them under the reference-era names users already import.
"""


class UserError(Exception):
    """A problem the user can fix; the message is one line naming it and the fix."""


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite: training diverged."""
