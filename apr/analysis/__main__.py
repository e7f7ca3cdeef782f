"""``python -m apr.analysis {heatmap,swap}``: see :mod:`apr.analysis.cli`."""

import sys

from apr.analysis.cli import main

sys.exit(main())
