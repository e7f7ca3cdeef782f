"""``apr-corrupt`` = ``python -m apr.corrupt``: an ImageNet-C-style tree from an image folder.

Only the console-script wrapper: the command's flags and work live in ``apr.corrupt``.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    """User errors print one ``error: ...`` line and return 2 (``--debug`` or APR_DEBUG=1 keeps the traceback)."""
    from apr.cli import run_main
    from apr.corrupt import main as command

    return run_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
