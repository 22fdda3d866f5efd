"""A warm `python -m ml_playground` for the test suite (started by conftest.py's `cli`).

Importing torch and Lightning costs ~7 s per process on 2 cores, more than most test commands
take to run. This process imports the CLI once, then forks one child per command: each child
is a real process that sets its working directory, environment and argv, sends its output to
files and runs the real `ml_playground.cli.main`, as `python -m ml_playground ARGS` would.

Protocol: one JSON request per line on stdin, `{"id", "args", "cwd", "env", "stdout",
"stderr", "file_size_limit"}` (RLIMIT_FSIZE with SIGXFSZ ignored, or null); JSON lines on the
file descriptor named by argv[1]: `{"id", "pid"}` when a command starts, `{"id", "pid",
"code"}` when it ends (code as subprocess reports it: negative for a signal). Single-threaded, so forking is safe.

DDP ranks start warm too. Lightning's launcher starts ranks 1.. as `sys.executable -m
ml_playground ARGS`; in the children, `sys.executable` is a small program (written to the
folder named by argv[2], see RANK_PROGRAM) that hands its command line, environment, working
directory and standard streams to this server over a Unix socket, and waits for the forked
child as if it were that child: it passes on SIGINT/SIGTERM, exits with the child's code, and
when it is killed the child notices (a pipe only it holds closes) and kills itself. Any other
command line (a compiler worker, say) runs the real interpreter.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib.util
import json
import os
import resource
import select
import signal
import socket
import sys
import threading
from pathlib import Path

import ml_playground.cli  # the expensive import, done once

REPLIES = int(sys.argv[1]) if __name__ == "__main__" else -1
RANK_PATH = Path(sys.argv[2] if __name__ == "__main__" else ".") / "python"
RANK_PROGRAM = """#!{python} -S
import json, os, resource, signal, socket, sys
python, address = {python!r}, {address!r}
if sys.argv[1:2] != ["-m"] or sys.argv[2] not in ("ml_playground", "ml_playground.__main__"):
    os.execv(python, [python, *sys.argv[1:]])
server = socket.socket(socket.AF_UNIX)
server.connect(address)
lifeline, keep = os.pipe()
limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
request = {{"args": sys.argv[3:], "cwd": os.getcwd(), "env": dict(os.environ),
           "file_size_limit": None if limit == resource.RLIM_INFINITY else limit}}
socket.send_fds(server, [b"r"], [0, 1, 2, lifeline])
server.sendall(json.dumps(request).encode() + b"\\n")
os.close(lifeline)
replies = server.makefile()
pid = json.loads(replies.readline())["pid"]
for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, lambda number, frame: os.kill(pid, number))
line = replies.readline()
code = json.loads(line)["code"] if line else 1
if code < 0:
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""
inherited: list[int] = []  # the server's descriptors, closed in each child


def child(request: dict, streams: list[int] | None = None) -> None:
    """Become `python -m ml_playground ARGS` (never returns). `streams`: the standard streams
    and life line a rank program sent; otherwise the request names files for the output."""
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in extra if p not in sys.path]
    null = os.open(os.devnull, os.O_RDONLY)
    for fd in inherited:  # not os.close: the server's socket objects close them at exit
        os.dup2(null, fd)
    if streams is None:
        os.dup2(null, 0)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
    else:
        for fd, received in enumerate(streams[:3]):
            os.dup2(received, fd)
        lifeline = streams[3]

        def follow_the_rank_program() -> None:
            os.read(lifeline, 1)  # returns when the rank program is gone
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=follow_the_rank_program, daemon=True).start()
    sys.executable = str(RANK_PATH)
    limit = request.get("file_size_limit")  # as a preexec_fn would set it
    if limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write is an OSError (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    # As in a terminal: the caller's runner (uv, a background shell) may ignore SIGINT, and a
    # process inherits that; Python only turns SIGINT into KeyboardInterrupt if it is not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    spec = importlib.util.find_spec("ml_playground.__main__")
    sys.modules["__main__"].__spec__ = spec  # Lightning's DDP launcher re-runs `-m <spec.name>`
    sys.argv = [spec.origin if spec and spec.origin else "ml_playground", *request["args"]]
    try:
        code = ml_playground.cli.main(request["args"])
    except SystemExit as exc:
        code = exc.code
    finish(code)


def finish(code: object) -> None:
    """Exit as `sys.exit(code)` would, minus tearing down the modules imported before the fork
    (over a second of CPU per command): wait for threads, run atexit, collect what this process
    made, flush, exit."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # what interpreter shutdown does first
    atexit._run_exitfuncs()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def reply(to: str | socket.socket, pid: int, code: int | None = None) -> None:
    """To the test suite (`to` a request id) or to a rank program (its connection)."""
    message = {"pid": pid} | ({} if code is None else {"code": code})
    if isinstance(to, socket.socket):
        # OSError: the rank program was killed (its child followed it through the life line)
        with contextlib.suppress(OSError):
            to.sendall((json.dumps(message) + "\n").encode())
        if code is not None:
            inherited.remove(to.fileno())
            to.close()
    else:
        os.write(REPLIES, (json.dumps({"id": to} | message) + "\n").encode())


def start(request: dict, to: str | socket.socket, streams: list[int] | None = None) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(request, streams)
    for fd in streams or []:
        os.close(fd)
    reply(to, pid)
    return pid


def accept_rank(listener: socket.socket) -> tuple[dict, socket.socket, list[int]]:
    connection, _ = listener.accept()
    _, streams, _, _ = socket.recv_fds(connection, 1, 4)
    connection.settimeout(30)
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("a rank program hung up before its request")
        data += chunk
    connection.settimeout(None)
    inherited.append(connection.fileno())
    return json.loads(data), connection, streams


def main() -> None:
    gc.freeze()  # what the imports made: children neither scan nor copy it when collecting
    listener = socket.socket(socket.AF_UNIX)
    RANK_PATH.with_suffix(".sock").unlink(missing_ok=True)
    listener.bind(str(RANK_PATH.with_suffix(".sock")))
    listener.listen(16)
    RANK_PATH.write_text(
        RANK_PROGRAM.format(python=sys.executable, address=str(RANK_PATH.with_suffix(".sock")))
    )
    RANK_PATH.chmod(0o755)
    inherited.extend([REPLIES, listener.fileno()])
    running: dict[int, str | socket.socket] = {}  # pid -> request id or rank connection
    pending = b""
    stdin_open = True
    while stdin_open or running:
        ready, _, _ = select.select([0, listener] if stdin_open else [listener], [], [], 0.02)
        if listener in ready:
            request, connection, streams = accept_rank(listener)
            running[start(request, connection, streams)] = connection
        if 0 in ready:
            chunk = os.read(0, 65536)
            stdin_open = bool(chunk)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                running[start(request, request["id"])] = request["id"]
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            reply(running.pop(pid), pid, os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
    finish(0)  # frozen objects left to shutdown make nanobind (triton) report "leaks"
