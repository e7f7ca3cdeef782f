#!/usr/bin/env python
"""Alias of the installed ``apr-train`` command (``python -m apr.commands.train``), for a source checkout."""

import sys

from apr.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
