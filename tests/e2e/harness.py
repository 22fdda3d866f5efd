"""What the end-to-end tests share: reading a command's outcome, the checkpoint folder and
TensorBoard, starting `fit` in the background, and the session's trained run
(`tests/e2e/conftest.py` builds it once for every module)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ml_playground.checkpoint_reading import LAST_PATTERN

ERROR_PREFIX = "ml-playground: error:"
SEPARATOR = "-" * 40
QUIET = ("--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu")
TRAIN_ENV = "ML_PLAYGROUND_TRAIN_OVERRIDES"
SAMPLE_ENV = "ML_PLAYGROUND_SAMPLE_OVERRIDES"
LAST_RE = re.compile(r"ckpt_last_\d{8}\.pt")
BEST_RE = re.compile(r"ckpt_best_\d{8}_val_loss=\d+\.\d{4}\.pt")

Result = subprocess.CompletedProcess
Cli = Callable[..., Result]  # conftest.py's `cli` and `cli_in_process`


# --------------------------------------------------------------------------- a command's outcome


def report(result: Result) -> str:
    return (
        f"exit {result.returncode}\nargs: {result.args}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )


def error_lines(result: Result) -> list[str]:
    """stderr without the informational `note:` lines a training run may print first."""
    return [
        line for line in result.stderr.splitlines() if line.strip() and not line.startswith("note:")
    ]


def assert_one_error_line(result: Result, exit_code: int | None, *mentions: str) -> str:
    """A non-zero exit (or the given code), one `ml-playground: error:` line, no traceback."""
    if exit_code is None:
        assert result.returncode not in (0, None), report(result)
    else:
        assert result.returncode == exit_code, report(result)
    lines = error_lines(result)
    assert len(lines) == 1, report(result)
    assert lines[0].startswith(ERROR_PREFIX), report(result)
    for text in mentions:
        assert text in lines[0], f"{text!r} not named\n{report(result)}"
    assert "Traceback" not in result.stderr + result.stdout, report(result)
    return lines[0]


def samples(stdout: str) -> list[str]:
    """The texts `sample` printed, each followed by a separator line."""
    assert stdout.endswith(SEPARATOR + "\n"), stdout
    chunks = stdout.split(SEPARATOR + "\n")[:-1]
    assert all(chunk.endswith("\n") for chunk in chunks), chunks
    return [chunk[:-1] for chunk in chunks]


# --------------------------------------------------------------------------- files


def snapshot(folder: Path) -> dict[str, int]:
    """Every file below `folder` with its modification time (ns)."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()
    }


def last_steps(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.glob("*") if (m := LAST_PATTERN.match(p.name)))


def ckpt_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("ckpt_"))


def leftovers(folder: Path) -> list[str]:
    """Temporary files of interrupted writes."""
    return [p.name for p in folder.iterdir() if ".tmp" in p.name]


def all_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar under `log_dir`: tag -> [(step, value)]."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_fit(cli: Any, config: Path, *flags: str, cwd: Path | None = None) -> Any:
    """`fit` in the background through the `cli` fixture (stderr kept, stdout dropped)."""
    return cli.start("fit", "--config", config, *flags, cwd=cwd or config.parent)


def wait_for(
    predicate: Callable[[], bool], process: subprocess.Popen, timeout: float = 120
) -> None:
    """Until `predicate()` holds; fails the test if `process` ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            pytest.fail(f"fit ended early: {process.stderr.read() if process.stderr else ''}")
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s")


def wait_for_step(folder: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until a `last` checkpoint of `step` or later is in `folder`."""
    wait_for(lambda: any(s >= step for s in last_steps(folder)), process, timeout)


# --------------------------------------------------------------------------- the trained run


@dataclass
class Trained:
    """prepare + a 20-step fit (validations at 10 and 20, last at 0, 5, ..., 20, keep.last 2
    -> ckpt_last 15 and 20), run once per session; read-only for the tests."""

    folder: Path
    config: Path
    prepare: Result
    fit: Result
    before: dict[str, int] = field(default_factory=dict)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def ckpt(self) -> Path:
        return self.folder / "ckpt"

    @property
    def log_dir(self) -> Path:
        return self.folder / "logs" / "tiny" / "version_0"

    def snapshot(self) -> dict[str, int]:
        return snapshot(self.folder)

    def fit_flags(self, folder: Path) -> tuple[str, ...]:
        """This run's config and data, with checkpoints and logs in `folder`."""
        return (
            "--config", str(self.config), "--data.dataset_dir", str(self.data),
            "--checkpointing.dirpath", str(folder / "ckpt"), "--log_dir", str(folder / "logs"),
            *QUIET,
        )  # fmt: skip


# --------------------------------------------------------------------------- the job pool


@dataclass(kw_only=True)
class Context:
    """What a job gets: the trained run, the CLI, fresh folders, and notes for its test."""

    trained: Trained
    cli: Callable[..., Result]
    mktemp: Callable[[str], Path]
    make_experiment: Callable[[Path], Path]
    notes: dict[str, Any] = field(default_factory=dict)


class JobPool:
    """A module's independent command sequences, started together once the trained run exists
    (starting Python with torch and Lightning costs seconds per command). Register one with
    `@pool.job`; inside `pool.running(context)`, `pool[name]` waits for its outcome."""

    def __init__(self) -> None:
        self.jobs: dict[str, Callable[[Any], Any]] = {}
        self.futures: dict[str, Future] = {}
        self.context: Any = None

    def job(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        self.jobs[fn.__name__] = fn
        return fn

    @contextmanager
    def running(self, context: Context, first: Sequence[str] = ()) -> Iterator[JobPool]:
        """Start every job (`first` ones first) on 2-4 workers; cancel what is left after."""
        self.context = context
        todo = {name: self.jobs[name] for name in first} | self.jobs
        workers = max(2, min(4, os.cpu_count() or 2))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            self.futures = {name: pool.submit(fn, context) for name, fn in todo.items()}
            try:
                yield self
            finally:
                for future in self.futures.values():
                    future.cancel()

    def __getitem__(self, name: str) -> Any:
        return self.futures[name].result(timeout=900)

    def wait_all(self) -> None:
        for future in self.futures.values():
            future.exception(timeout=900)
