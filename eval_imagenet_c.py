#!/usr/bin/env python
"""Alias of the installed ``apr-eval`` command (``python -m apr.commands.evaluate``), for a source checkout."""

import sys

from apr.commands.evaluate import main  # noqa: F401  (tests import main from here)

if __name__ == "__main__":
    sys.exit(main())
