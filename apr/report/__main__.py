import sys

from apr.cli import run_main
from apr.report import main

sys.exit(run_main(main))
