"""Errors a user can cause, and how they reach the terminal.

Anything raised as `UserError` ends the command with exit code 2 and one line naming the file, the record and what
was expected — never a traceback. `TrainingDiverged` ends it with exit code 3 after the last good checkpoint is safe.
"""


class UserError(Exception):
    """A problem in the user's input (file, record, config value): exit code 2, one clear message."""

    exit_code = 2


class TrainingDiverged(Exception):
    """The loss became NaN or infinite: the run stops, keeping the last complete checkpoint."""

    exit_code = 3
