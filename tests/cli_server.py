"""A warm `python -m ml_playground` for the test suite (started by conftest.py's `cli`).

Importing torch and Lightning costs ~7 s per process on 2 cores, more than most test commands
take to run. This process imports the CLI once, then forks one child per command: each child
is a real process that sets its working directory, environment and argv, sends its output to
files and runs the real `ml_playground.cli.main`, as `python -m ml_playground ARGS` would.

Protocol: one JSON request per line on stdin, `{"id", "args", "cwd", "env", "stdout",
"stderr", "file_size_limit"}` (RLIMIT_FSIZE with SIGXFSZ ignored, or null); JSON lines on the
file descriptor named by argv[1]: `{"id", "pid"}` when a command starts, `{"id", "pid",
"code"}` when it ends (code as subprocess reports it: negative for a signal), and `{"id",
"error"}` when the server cannot start a command safely (it exits then).

Forking is only safe from a single-threaded process: a thread that held a lock at the fork
(an allocator's, a logging handler's) leaves it held forever in the child. The server starts
no threads and checks before every fork that it has none (Python's and native ones), so a new
import that starts one fails the suite loudly instead of hanging a command now and then.

A child's DDP ranks are not warm: Lightning's launcher (`--trainer.devices 2` in one command)
starts ranks 1.. as `python -m ml_playground ARGS`, fresh processes. Tests that need many
warm ranks start one command per rank themselves, as torchrun would (test_distributed.py).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import os
import resource
import select
import signal
import sys
import threading
from pathlib import Path

# numpy's OpenBLAS starts a worker thread per further core as it loads, which would make every
# fork below unsafe. The children then run numpy's BLAS on one thread; training never uses it
# (torch has its own thread pool, which starts in the child, at its first operation).
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import ml_playground.cli  # the expensive import, done once
from ml_playground.__main__ import exit_without_teardown

REPLIES = int(sys.argv[1]) if __name__ == "__main__" else -1


def child(request: dict) -> None:
    """Become `python -m ml_playground ARGS` (never returns)."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in extra if p not in sys.path]
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, REPLIES)  # the command must not hold the suite's reply pipe open
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    limit = request.get("file_size_limit")  # as a preexec_fn would set it
    if limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write is an OSError (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    # As in a terminal: the caller's runner (uv, a background shell) may ignore SIGINT, and a
    # process inherits that; Python only turns SIGINT into KeyboardInterrupt if it is not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # What `python -m ml_playground` sets: Lightning's DDP launcher starts the other ranks
    # as `sys.executable -m <__main__.__spec__.name> <sys.argv[1:]>`.
    spec = importlib.util.find_spec("ml_playground.__main__")
    sys.modules["__main__"].__spec__ = spec
    sys.argv = [spec.origin if spec and spec.origin else "ml_playground", *request["args"]]
    try:
        code = ml_playground.cli.main(request["args"])
    except SystemExit as exc:
        code = exc.code
    finish(code)


def finish(code: object) -> None:
    """Exit as the console script does (`exit_without_teardown`): the modules imported before
    the fork are not torn down."""
    exit_without_teardown(code)


def reply(message: dict) -> None:
    os.write(REPLIES, (json.dumps(message) + "\n").encode())


def thread_count() -> int:
    """This process's threads: /proc/self/task also lists native ones (a C library's pool),
    which `threading` does not know of."""
    tasks = Path("/proc/self/task")
    native = len(list(tasks.iterdir())) if tasks.is_dir() else 1  # not Linux: Python's only
    return max(native, threading.active_count())


def start(request: dict) -> int | None:
    """Fork the command's process; None, after telling the suite why, if this process has
    more than one thread (forking it would not be safe)."""
    if (count := thread_count()) > 1:
        named = [thread.name for thread in threading.enumerate()[1:]]
        reply({"id": request["id"], "error": (
            f"the server has {count} threads (started from Python: {named or 'none'}), so "
            "forking it is not safe: something it imports started one. Stop that (as "
            "OPENBLAS_NUM_THREADS=1 does for numpy) or run the suite with "
            "ML_PLAYGROUND_TEST_COLD=1"
        )})  # fmt: skip
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(request)
    reply({"id": request["id"], "pid": pid})
    return pid


def main() -> int:
    gc.freeze()  # what the imports made: children neither scan nor copy it when collecting
    running: dict[int, str] = {}  # pid -> request id
    pending = b""
    stdin_open = True
    while stdin_open or running:
        ready, _, _ = select.select([0] if stdin_open else [], [], [], 0.02)
        if ready:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                pid = start(request)
                if pid is None:
                    return 1
                running[pid] = request["id"]
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            request_id = running.pop(pid)
            reply({"id": request_id, "pid": pid, "code": os.waitstatus_to_exitcode(status)})
    return 0


if __name__ == "__main__":
    # Not sys.exit: frozen objects left to shutdown make nanobind (triton) report "leaks".
    finish(main())
