"""``apr-layout`` = ``python -m apr.data.layout``: check an ImageNet-layout folder and list unreadable images.

Only the console-script wrapper: the command's flags and work live in ``apr.data.layout``.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    """User errors print one ``error: ...`` line and return 2 (``--debug`` or APR_DEBUG=1 keeps the traceback)."""
    from apr.cli import run_main
    from apr.data.layout import main as command

    return run_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
