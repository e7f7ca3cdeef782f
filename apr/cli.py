"""Entry-point wrapper: user errors become one ``error:`` line, bugs keep their traceback.

    sys.exit(run_main(main))          # main(argv) -> int

``--debug`` on the command line (removed before ``main`` sees it) or ``APR_DEBUG=1`` re-raises
everything with its full traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Sequence

from apr.errors import UserError

__all__ = ["run_main", "format_user_error", "DEBUG_ENV"]

DEBUG_ENV = "APR_DEBUG"
_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def format_user_error(exc: BaseException) -> str | None:
    """The one-line message for a user error, or None when ``exc`` is a bug."""
    if isinstance(exc, UserError):
        return str(exc)
    try:
        import yaml
    except ImportError:  # pragma: no cover - yaml is a dependency
        yaml = None
    if yaml is not None and isinstance(exc, yaml.YAMLError):
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        name = getattr(mark, "name", None)
        source = f"{name}: " if name and not str(name).startswith("<") else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        return f"{source}YAML syntax error{where}: {problem}"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS:  # a full disk or a read-only folder
        return str(exc)
    return None


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; print a user error as ``error: ...`` and return 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        return main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - classified below, bugs re-raised
        message = format_user_error(exc)
        if debug or message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        print(f"(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 2
