"""`python -m ml_playground` runs the console script."""

import sys

from ml_playground.cli import main

sys.exit(main())
