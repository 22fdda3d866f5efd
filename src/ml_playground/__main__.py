"""The `ml-playground` console script and `python -m ml_playground`.

Importing the command line takes seconds (Lightning, torch); a Ctrl-C in them ends with the
same one line and exit code as one later on, not a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from ml_playground.cli import main as run
    except KeyboardInterrupt:
        print("ml-playground: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
