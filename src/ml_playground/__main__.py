"""The `ml-playground` console script and `python -m ml_playground`.

Importing the command line takes seconds (Lightning, torch); a Ctrl-C in them ends with the
same one line and exit code as one later on, not a traceback. Ending takes no second either:
`exit_without_teardown`.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from ml_playground.cli import main as run
    except KeyboardInterrupt:
        print("ml-playground: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return run(argv)


def exit_without_teardown(code: object) -> NoReturn:
    """Exit as `sys.exit(code)` would, minus the interpreter tearing down torch's and
    Lightning's modules (about a second of CPU on 2 cores, on every command): threads are
    waited for, atexit handlers run, objects in reference cycles are collected (their
    finalizers close what they hold), the streams are flushed; then the process ends."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # what interpreter shutdown does first
    atexit._run_exitfuncs()
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


def console() -> NoReturn:
    """The `ml-playground` console script."""
    exit_without_teardown(main())


if __name__ == "__main__":
    console()
