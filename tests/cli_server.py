"""A warm `python -m ml_playground` for the test suite (started by conftest.py's `cli`).

Importing torch and Lightning costs ~7 s per process on 2 cores, more than most test commands
take to run. This process imports the CLI once, then forks one child per command: each child
is a real process that sets its working directory, environment and argv, sends its output to
files and runs the real `ml_playground.cli.main`, as `python -m ml_playground ARGS` would.

Protocol: one JSON request per line on stdin, `{"id", "args", "cwd", "env", "stdout",
"stderr"}`; JSON lines on the file descriptor named by argv[1]: `{"id", "pid"}` when a
command starts, `{"id", "pid", "code"}` when it ends (code as subprocess reports it: negative
for a signal). Single-threaded, so forking is safe.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import signal
import sys

import ml_playground.cli  # the expensive import, done once

REPLIES = int(sys.argv[1]) if __name__ == "__main__" else -1


def child(request: dict) -> None:
    """Become `python -m ml_playground ARGS` (never returns)."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in extra if p not in sys.path]
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    os.close(REPLIES)
    # As in a terminal: the caller's runner (uv, a background shell) may ignore SIGINT, and a
    # process inherits that; Python only turns SIGINT into KeyboardInterrupt if it is not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    spec = importlib.util.find_spec("ml_playground.__main__")
    sys.modules["__main__"].__spec__ = spec  # Lightning's DDP launcher re-runs `-m <spec.name>`
    sys.argv = [spec.origin if spec and spec.origin else "ml_playground", *request["args"]]
    sys.exit(ml_playground.cli.main(request["args"]))


def reply(request_id: str, pid: int, code: int | None = None) -> None:
    message = {"id": request_id, "pid": pid} | ({} if code is None else {"code": code})
    os.write(REPLIES, (json.dumps(message) + "\n").encode())


def main() -> None:
    running: dict[int, str] = {}  # pid -> request id
    pending = b""
    stdin_open = True
    while stdin_open or running:
        if stdin_open:
            ready, _, _ = select.select([0], [], [], 0.02)
            if ready:
                chunk = os.read(0, 65536)
                stdin_open = bool(chunk)
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    request = json.loads(line)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        child(request)
                    running[pid] = request["id"]
                    reply(request["id"], pid)
        else:
            select.select([], [], [], 0.02)
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            reply(running.pop(pid), pid, os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
