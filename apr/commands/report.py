"""``apr-report`` = ``python -m apr.report``: report.md, plots and summary.json from results files alone.

Only the console-script wrapper: the command's flags and work live in ``apr.report``.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    """User errors print one ``error: ...`` line and return 2 (``--debug`` or APR_DEBUG=1 keeps the traceback)."""
    from apr.cli import run_main
    from apr.report import main as command

    return run_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
