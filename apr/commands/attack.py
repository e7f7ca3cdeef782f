"""``apr-attack`` = ``python -m apr.adversarial``: FGSM / PGD / AutoAttack robust accuracy.

Only the console-script wrapper: the command's flags and work live in ``apr.adversarial.__main__``.
"""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    """User errors print one ``error: ...`` line and return 2 (``--debug`` or APR_DEBUG=1 keeps the traceback)."""
    from apr.cli import run_main
    from apr.adversarial.__main__ import main as command

    return run_main(command, argv)


if __name__ == "__main__":
    sys.exit(main())
