"""The project's user-facing error base: a wrong input, not a bug.

Command-line entry points (``apr.cli.run_main``) print a :class:`UserError` as one ``error:`` line
and exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserError", "OutputError"]


class UserError(Exception):
    """A problem the user can fix (data, config, checkpoint, options); its message names the fix."""


class OutputError(UserError, OSError):
    """An output path that cannot be written: a file where a folder is wanted, read-only, disk full."""
