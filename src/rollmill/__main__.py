"""`python -m rollmill ...`: the same command line as the installed `rollmill` script."""

import sys

from rollmill.cli import main

sys.exit(main())
