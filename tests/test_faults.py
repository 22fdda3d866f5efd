"""Faults met in-process (rows of docs/reliability.md): the fit lock, failed checkpoint
writes, Ctrl-C inside a write, unexpected OSErrors in the CLI. Rows through the real CLI are
in tests/e2e/test_reliability.py; NaN weights in tests/test_retention.py."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ml_playground import cli
from ml_playground.checkpoint_writing import AtomicCheckpointIO
from ml_playground.errors import CheckpointError, ConfigError, shorten
from ml_playground.interrupts import hold_interrupts
from ml_playground.locking import LOCK_FILENAME, FolderLock

# --------------------------------------------------------------------------- the fit lock

HOLD = """
import sys, time
from ml_playground.locking import FolderLock
lock = FolderLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding the folder's lock (until it is killed)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def test_lock_is_created_held_and_released(tmp_path: Path) -> None:
    lock = FolderLock(tmp_path / "ckpt")
    lock.acquire()
    assert lock.held and (tmp_path / "ckpt" / LOCK_FILENAME).is_file()
    second = FolderLock(tmp_path / "ckpt")
    second.release()  # not held: leaves the first one's lock alone
    assert (tmp_path / "ckpt" / LOCK_FILENAME).exists()
    lock.release()
    assert not lock.held and list((tmp_path / "ckpt").iterdir()) == []


def test_lock_of_a_live_process_blocks_and_names_it(tmp_path: Path) -> None:
    process = holder(tmp_path)
    try:
        with pytest.raises(CheckpointError) as info:
            FolderLock(tmp_path).acquire()
        message = str(info.value)
        assert f"in use by another fit (process {process.pid} on {socket.gethostname()}" in message
        assert f"delete {tmp_path / LOCK_FILENAME}" in message and "\n" not in message
    finally:
        process.kill()
        process.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    process = holder(tmp_path)
    process.kill()
    process.wait()
    assert (tmp_path / LOCK_FILENAME).exists()  # left behind by the killed run
    lock = FolderLock(tmp_path)
    lock.acquire()
    lock.release()
    assert list(tmp_path.iterdir()) == []


def test_unreadable_lock_blocks_with_the_way_out(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILENAME).write_text("")
    with pytest.raises(CheckpointError, match=r"another process holds .*delete"):
        FolderLock(tmp_path).acquire()


def test_lock_in_an_unusable_folder_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="ckpt is below a file"):
        FolderLock(blocker / "ckpt").acquire()
    with pytest.raises(ConfigError, match="file is a file; give the path of a folder"):
        FolderLock(blocker).acquire()


# --------------------------------------------------------------------------- failed writes


def test_disk_full_while_writing_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    good = tmp_path / "ckpt_last_00000005.pt"
    io.save_checkpoint({"weights": torch.ones(3)}, good)
    before = good.read_bytes()

    def full_disk(obj: Any, handle: Any) -> None:
        handle.write(b"x" * 1000)  # part of the file got out
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:  # torch's zip writer reports it as a RuntimeError
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from None

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as info:
        io.save_checkpoint({"weights": torch.zeros(3)}, tmp_path / "ckpt_last_00000010.pt")
    message = str(info.value)
    assert "No space left on device" in message and "ckpt_last_00000010.pt" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # no partial file
    assert good.read_bytes() == before


def test_other_write_failures_keep_their_type(tmp_path: Path) -> None:
    with pytest.raises(Exception) as info:  # pickling a lambda
        AtomicCheckpointIO().save_checkpoint(
            {"bad": lambda: None}, tmp_path / "ckpt_last_00000001.pt"
        )
    assert not isinstance(info.value, CheckpointError)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_inside_torch_save_stays_an_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's zip writer turns a KeyboardInterrupt into a RuntimeError while cleaning up."""

    def interrupted_save(obj: Any, handle: Any) -> None:
        handle.write(b"part of a checkpoint")
        try:
            raise KeyboardInterrupt
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint(
            {"w": torch.ones(1)}, tmp_path / "ckpt_last_00000001.pt"
        )
    assert list(tmp_path.iterdir()) == []  # no partial file


def test_ctrl_c_during_a_write_and_its_rotation_lands_after_both(tmp_path: Path) -> None:
    """A real SIGINT between writing the new best and deleting the old one: both steps run,
    then the interrupt is raised, once, however many came."""
    old, new = tmp_path / "old.pt", tmp_path / "new.pt"
    old.write_bytes(b"old")
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own
    try:
        with pytest.raises(KeyboardInterrupt), hold_interrupts():
            new.write_bytes(b"new")
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            old.unlink()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert [p.name for p in tmp_path.iterdir()] == ["new.pt"]


# --------------------------------------------------------------------------- unexpected OSError


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/out"),
            "ml-playground: error: Permission denied: /data/out",
        ),
        (
            OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"),
            "ml-playground: error: Invalid cross-device link: /a -> /b",
        ),
        (OSError("bare"), "ml-playground: error: bare"),
    ],
)
def test_unexpected_os_error_is_one_line(
    exc: OSError, line: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def fail(argv: Any) -> None:
        raise exc

    monkeypatch.delenv("ML_PLAYGROUND_DEBUG", raising=False)
    monkeypatch.setattr(cli, "PlaygroundCLI", fail)
    assert cli.main(["fit"]) == 1
    assert capsys.readouterr().err == line + "\n"
    with pytest.raises(OSError):
        cli.main(["fit", "--debug"])


def test_a_shortened_message_is_cut_at_a_word_and_says_so() -> None:
    text = "Weights only load failed because the file holds an unsupported operand"
    assert shorten(text, len(text)) == text
    assert shorten(text, 30) == "Weights only load failed…"  # not "… failed beca"
    assert shorten("/a/very/long/path/without/spaces", 10) == "/a/very/l…"  # one long word
