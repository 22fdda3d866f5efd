"""Shared fixtures: a tiny deterministic corpus, a tiny experiment file, and the real CLI."""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cold: signals and DDP ranks, where how a process starts matters: .ci/run runs these "
        "tests again with ML_PLAYGROUND_TEST_COLD=1 (a fresh `python -m ml_playground` per "
        "command instead of a fork of tests/cli_server.py)",
    )
    # Each xdist worker, and every command it starts, gets its share of the cores: torch's
    # default (one thread per core in every process) oversubscribes them, and its threads then
    # spin against each other (a 3-second fit took 24 s beside a torch.compile test).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the commands tests start
        import torch

        torch.set_num_threads(threads)  # this worker's in-process commands


WORDS = [
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "king"),
    *("and", "queen", "speak", "of", "love", "war", "night", "day", "sword", "crown"),
    *("heart", "blood", "field", "river", "wind", "stone", "fire", "gold"),
]

# The settings every test run uses: a model small enough to train in seconds on a CPU.
TINY_TOML = """\
experiment = "tiny"
seed_everything = 7
log_dir = "logs"

[prepare]
source = "{source}"
source_sha256 = ""
tokenizer = "char"
val_fraction = 0.1

[data]
dataset_dir = "data"
batch_size = 4
block_size = 16
val_batches = 2
pin_memory = false

[model]
n_layer = 1
n_head = 2
n_embd = 16
block_size = 16
learning_rate = 1e-2
min_lr = 1e-3
warmup_steps = 2
lr_decay_steps = 20

[trainer]
accelerator = "cpu"
devices = 1
max_steps = 20
val_check_interval = 10
log_every_n_steps = 1
enable_progress_bar = false

[checkpointing]
dirpath = "ckpt"
every_n_steps = 5

[checkpointing.keep]
last = 2
best = 1

[sample]
ckpt = "best"
prompt = "the "
num_samples = 2
max_new_tokens = 24
top_k = 10
"""


def make_corpus_text(n_lines: int = 120, seed: int = 1234) -> str:
    """Deterministic English-ish text: a handful of words, capitals, punctuation, newlines."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 9))]
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(".,;!?"))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return make_corpus_text()


@pytest.fixture
def corpus(tmp_path: Path, corpus_text: str) -> Path:
    """A tiny UTF-8 corpus file (about 4 KB, a few dozen distinct characters)."""
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text, encoding="utf-8")
    return path


def write_experiment_toml(path: Path, source: Path, **replacements: str) -> Path:
    """Write the tiny experiment to `path`; `replacements` maps TOML lines to new text."""
    text = TINY_TOML.format(source=source.as_posix())
    for old, new in replacements.items():
        assert old in text, f"{old!r} is not a line of the tiny experiment"
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    return path


MakeExperiment = Callable[[Path], Path]


@pytest.fixture(scope="session")
def make_experiment(corpus_text: str) -> MakeExperiment:
    """`make_experiment(folder)` writes folder/corpus.txt and folder/exp.toml; returns the toml."""

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / "corpus.txt"
        source.write_text(corpus_text, encoding="utf-8")
        return write_experiment_toml(folder / "exp.toml", source)

    return make


@pytest.fixture(scope="session")
def prepared_experiment(tmp_path_factory: pytest.TempPathFactory, make_experiment) -> Path:
    """The tiny experiment with its dataset prepared in-process (folder/data); read-only."""
    from ml_playground.configuration import load_experiment_toml
    from ml_playground.prepare import run_prepare

    config = make_experiment(tmp_path_factory.mktemp("prepared"))
    cfg = load_experiment_toml(config)
    run_prepare(cfg.prepare, cfg.data.dataset_dir, seed=cfg.seed_everything)
    return config


@pytest.fixture
def experiment_toml(tmp_path: Path, corpus: Path) -> Path:
    """`tmp_path/exp.toml`: a tiny experiment whose relative paths resolve into tmp_path."""
    return write_experiment_toml(tmp_path / "exp.toml", corpus)


# --------------------------------------------------------------------------- the real CLI

Cli = Callable[..., subprocess.CompletedProcess]


def format_result(result: subprocess.CompletedProcess) -> str:
    """A failed command with everything it printed, for assertion messages."""
    return (
        f"command: {' '.join(map(str, result.args))}\n"
        f"exit code: {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


class WarmProcess:
    """What the tests use of a Popen, for a child of tests/cli_server.py."""

    def __init__(self, args: list[str], slot: dict[str, Any], out: Path, err: Path) -> None:
        self.args, self.slot, self.out, self.err = args, slot, out, err
        deadline = time.monotonic() + 600  # the server's first command waits for its imports
        while "pid" not in slot and not slot["done"].is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        if "pid" not in slot:
            reason = slot.get("error", "see its stderr")
            raise RuntimeError(f"tests/cli_server.py did not start the command: {reason}")
        self.pid: int = slot["pid"]
        self.stderr = self  # `process.stderr.read()`, as with stderr=PIPE

    @property
    def returncode(self) -> int | None:
        return self.slot.get("code")

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        if not self.slot["done"].wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self.slot["code"]

    def read(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        stdout, stderr = self.out.read_text(errors="replace"), self.read()
        self.out.unlink(missing_ok=True)
        self.err.unlink(missing_ok=True)
        return stdout, stderr


class WarmCli:
    """Runs commands through tests/cli_server.py: a process that imported the CLI once and
    forks a real child process per command (set ML_PLAYGROUND_TEST_COLD=1 to start a fresh
    `python -m ml_playground` per command instead)."""

    def __init__(self, env: Mapping[str, str], folder: Path) -> None:
        self.folder = folder  # where the commands' stdout and stderr files go
        self.failure: str | None = None  # why the server stopped starting commands
        read_end, write_end = os.pipe()
        server = Path(__file__).with_name("cli_server.py")
        self.process = subprocess.Popen(
            [sys.executable, str(server), str(write_end)],
            stdin=subprocess.PIPE,
            pass_fds=(write_end,),
            env=dict(env),
        )
        os.close(write_end)
        self.replies = os.fdopen(read_end, "r")
        self.lock = threading.Lock()
        self.slots: dict[str, dict[str, Any]] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.replies:
            message = json.loads(line)
            slot = self.slots[message["id"]]
            slot.update(message)
            if "error" in message:
                self.failure = message["error"]
            if "code" in message or "error" in message:
                slot["done"].set()
        for slot in list(self.slots.values()):  # the server is gone: nothing will end
            slot.setdefault("code", 1)
            slot["done"].set()

    def start(
        self, args: list[str], cwd: Path, env: Mapping[str, str], file_size_limit: int | None
    ) -> WarmProcess:
        """The command in a child process, running in the background."""
        if self.failure is not None:
            raise RuntimeError(f"tests/cli_server.py stopped: {self.failure}")
        request_id = uuid.uuid4().hex
        out, err = self.folder / f"{request_id}.out", self.folder / f"{request_id}.err"
        slot: dict[str, Any] = {"done": threading.Event()}
        self.slots[request_id] = slot
        request = {"id": request_id, "args": args, "cwd": str(cwd), "env": dict(env),
                   "stdout": str(out), "stderr": str(err), "file_size_limit": file_size_limit}  # fmt: skip
        with self.lock:
            assert self.process.stdin is not None
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            self.process.stdin.flush()
        return WarmProcess([sys.executable, "-m", "ml_playground", *args], slot, out, err)

    def run(
        self, args: list[str], cwd: Path, env: Mapping[str, str], timeout: float,
        file_size_limit: int | None,
    ) -> subprocess.CompletedProcess:  # fmt: skip
        process = self.start(args, cwd, env, file_size_limit)
        try:
            stdout, stderr = process.communicate(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="session")
def download_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ML_PLAYGROUND_CACHE of the commands the tests run: fresh, in a temporary folder."""
    return tmp_path_factory.mktemp("ml_playground_cache")


@pytest.fixture(scope="session")
def cli(tmp_path_factory: pytest.TempPathFactory, download_cache: Path) -> Iterator[Cli]:
    """`cli(*args, cwd=..., env=None, check=True)`: `python -m ml_playground ARGS` in a child
    process (forked from a warm one, see WarmCli).

    The child gets a fresh download cache in a temporary folder and none of the caller's
    ML_PLAYGROUND_* variables; `env` adds variables (a None value removes one). With
    `check=True` a non-zero exit fails the test and shows stdout and stderr.
    """
    cache = download_cache
    # Commands read torch's and Lightning's bytecode where uv installed it (compile-bytecode in
    # pyproject.toml), and cache the project's own in its __pycache__ folders (git ignores them).
    base = {k: v for k, v in os.environ.items() if not k.startswith("ML_PLAYGROUND_")}
    base.pop("PYTHONDONTWRITEBYTECODE", None)
    warm = None
    if os.environ.get("ML_PLAYGROUND_TEST_COLD", "") in ("", "0"):
        warm = WarmCli(base, tmp_path_factory.mktemp("cli_output"))

    def environment(extra: Mapping[str, str | None] | None) -> dict[str, str]:
        full_env = dict(base, ML_PLAYGROUND_CACHE=str(cache))
        for key, value in (extra or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        return full_env

    def preexec(file_size_limit: int | None) -> Callable[[], None]:
        """For a cold process: what cli_server.py does for a warm one."""

        def setup() -> None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal
            if file_size_limit is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        return setup

    def run(
        *args: str | os.PathLike[str],
        cwd: Path,
        env: Mapping[str, str | None] | None = None,
        check: bool = True,
        file_size_limit: int | None = None,
    ) -> subprocess.CompletedProcess:
        full_env = environment(env)
        argv = [str(arg) for arg in args]
        if warm is not None:
            result = warm.run(argv, cwd, full_env, 300, file_size_limit)
        else:
            result = subprocess.run(
                [sys.executable, "-m", "ml_playground", *argv], cwd=cwd, env=full_env,
                capture_output=True, text=True, timeout=300, check=False,
                preexec_fn=preexec(file_size_limit),
            )  # fmt: skip
        if check:
            assert result.returncode == 0, "command failed\n" + format_result(result)
        return result

    def start(
        *args: str | os.PathLike[str],
        cwd: Path,
        env: Mapping[str, str | None] | None = None,
        file_size_limit: int | None = None,
        stdout: bool = False,
    ) -> Any:
        """The command in the background: a WarmProcess (a Popen when cold), whose
        `communicate()` gives stderr, and stdout when `stdout` (a warm one always keeps it)."""
        full_env = environment(env)
        argv = [str(arg) for arg in args]
        if warm is not None:
            return warm.start(argv, cwd, full_env, file_size_limit)
        return subprocess.Popen(
            [sys.executable, "-m", "ml_playground", *argv], cwd=cwd, env=full_env,
            stdout=subprocess.PIPE if stdout else subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, preexec_fn=preexec(file_size_limit),
        )  # fmt: skip

    run.start = start  # type: ignore[attr-defined]
    yield run
    if warm is not None:
        warm.close()


@contextmanager
def warnings_on_stderr() -> Iterator[None]:
    """Python warnings printed on sys.stderr, as a process of its own prints them (pytest
    collects them instead): a stray warning breaks a one-line check in-process too."""

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:  # fmt: skip
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@pytest.fixture
def cli_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], download_cache: Path
) -> Cli:
    """`cli`'s twin for a command whose outcome is only its exit code and what it prints (a
    configuration error, say): the same call, run by `ml_playground.cli.main` in this process,
    with the same working directory and environment, its output read from capsys. Nothing
    happens in parallel here, and no signal or process is involved: where they matter, or a
    command trains, use `cli`."""
    from ml_playground.__main__ import __file__ as main_file
    from ml_playground.cli import main

    def run(
        *args: str | os.PathLike[str],
        cwd: Path,
        env: Mapping[str, str | None] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        argv = [str(arg) for arg in args]
        with monkeypatch.context() as patch:
            patch.chdir(cwd)
            for key in [key for key in os.environ if key.startswith("ML_PLAYGROUND_")]:
                patch.delenv(key)
            patch.setenv("ML_PLAYGROUND_CACHE", str(download_cache))
            for key, value in (env or {}).items():
                if value is None:
                    patch.delenv(key, raising=False)
                else:
                    patch.setenv(key, value)
            patch.setattr(sys, "argv", [main_file, *argv])  # as `python -m ml_playground` has
            before = dict(os.environ)
            capsys.readouterr()  # only this command's output
            try:
                with warnings_on_stderr():
                    code = main(argv)
            finally:  # what the command set itself (Lightning's PL_GLOBAL_SEED, say)
                os.environ.clear()
                os.environ.update(before)
            out, err = capsys.readouterr()
        result = subprocess.CompletedProcess(["ml-playground", *argv], code, out, err)
        if check:
            assert result.returncode == 0, "command failed\n" + format_result(result)
        return result

    return run


@pytest.fixture(scope="session")
def batch_trace() -> Callable[[Path], tuple[list[str], dict[str, str]]]:
    """`batch_trace(folder)`: the flags and environment that add tests/e2e/batch_trace.py's
    callback to a CLI run (every rank logs its training batches into `folder`)."""

    def make(folder: Path) -> tuple[list[str], dict[str, str]]:
        folder.mkdir(parents=True, exist_ok=True)
        flags = [
            "--trainer.callbacks+=batch_trace.BatchTrace",
            f"--trainer.callbacks.folder={folder}",
        ]
        paths = [str(Path(__file__).parent / "e2e"), os.environ.get("PYTHONPATH", "")]
        return flags, {"PYTHONPATH": os.pathsep.join(p for p in paths if p)}

    return make


@pytest.fixture
def run_cli(tmp_path: Path, cli: Cli) -> Cli:
    """`run_cli(*args, env=None, cwd=None, check=True)`: the CLI, run in tmp_path by default."""

    def run(
        *args: str | os.PathLike[str],
        env: Mapping[str, str | None] | None = None,
        cwd: Path | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess:
        return cli(*args, cwd=cwd or tmp_path, env=env, check=check)

    return run
