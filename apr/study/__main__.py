import sys

from apr.study.cli import main

sys.exit(main())
