"""Errors raised by the vbsw core.

The core never prints and never exits: it raises one of these, and the command
line layer turns it into one line on stderr and an exit code.
"""


class VbswError(Exception):
    """Base class of every error the toolchain reports to a user."""

    exit_code = 1


class DataError(VbswError):
    """The data or the model is unusable (exit code 1)."""

    exit_code = 1


class UsageError(VbswError):
    """The command was called wrongly: an option is out of range (exit code 2)."""

    exit_code = 2
