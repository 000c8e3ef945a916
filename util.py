"""Training utilities shared by the entry scripts.

Schedules, meters, checkpoints, device and distributed set-up and TensorBoard
logging live here; datasets and transforms live in ``data.py``.
"""


class UserError(Exception):
    """A problem the user can fix; the message is one line naming it and the fix."""
