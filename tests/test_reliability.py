"""Reliability rows of docs/reliability.md checked in-process: the fit lock, failed checkpoint
writes, refusing NaN weights, unexpected OSErrors in the CLI, and token ids the data module
should refuse. The same rows through the real CLI are in tests/e2e/test_reliability.py."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from ml_playground import cli
from ml_playground.checkpoint_files import last_name
from ml_playground.checkpointing import AtomicCheckpointIO, GPTCheckpoint
from ml_playground.errors import CheckpointError, DataError, TrainingError
from ml_playground.training import LOCK_FILENAME, FolderLock

# --------------------------------------------------------------------------- the fit lock


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_lock_is_created_held_and_released(tmp_path: Path) -> None:
    lock = FolderLock(tmp_path / "ckpt")
    lock.acquire()
    pid, host = (tmp_path / "ckpt" / LOCK_FILENAME).read_text().split()
    assert int(pid) == os.getpid() and host
    second = FolderLock(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=rf"in use by another fit \(process {os.getpid()}"):
        second.acquire()
    second.release()  # not held: leaves the first one's lock alone
    assert (tmp_path / "ckpt" / LOCK_FILENAME).exists()
    lock.release()
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_lock_of_a_live_process_blocks(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILENAME).write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        with pytest.raises(CheckpointError, match=f"process {sleeper.pid}") as info:
            FolderLock(tmp_path).acquire()
        assert f"delete {tmp_path / LOCK_FILENAME}" in str(info.value)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    import socket

    (tmp_path / LOCK_FILENAME).write_text(f"{dead_pid()} {socket.gethostname()}\n")
    lock = FolderLock(tmp_path)
    lock.acquire()
    assert (tmp_path / LOCK_FILENAME).read_text().split()[0] == str(os.getpid())
    lock.release()


def test_lock_of_another_host_blocks(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILENAME).write_text(f"{dead_pid()} some-other-host\n")
    with pytest.raises(CheckpointError, match="on some-other-host"):
        FolderLock(tmp_path).acquire()


def test_unreadable_lock_blocks_while_young_and_is_stale_when_old(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILENAME
    path.write_text("")  # created but not yet written by its owner
    with pytest.raises(CheckpointError, match="another process"):
        FolderLock(tmp_path).acquire()
    old = time.time() - 60
    os.utime(path, (old, old))
    lock = FolderLock(tmp_path)
    lock.acquire()
    lock.release()


def test_lock_in_an_unusable_folder_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match="is not writable"):
        FolderLock(blocker / "ckpt").acquire()


# --------------------------------------------------------------------------- failed writes


def test_disk_full_while_writing_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    good = tmp_path / last_name(5)
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
        io.save_checkpoint({"weights": torch.zeros(3)}, tmp_path / last_name(10))
    message = str(info.value)
    assert "No space left on device" in message and last_name(10) in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]  # no partial file
    assert good.read_bytes() == before


def test_other_write_failures_keep_their_type(tmp_path: Path) -> None:
    with pytest.raises(Exception) as info:  # pickling a lambda
        AtomicCheckpointIO().save_checkpoint({"bad": lambda: None}, tmp_path / last_name(1))
    assert not isinstance(info.value, CheckpointError)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- NaN weights


def test_checkpoint_with_nan_weights_is_refused(tmp_path: Path) -> None:
    from ml_playground.checkpointing import CheckpointExtras

    callback = GPTCheckpoint(
        dirpath=tmp_path, every_n_steps=1, metric="val/loss", mode="min", patience=0,
        keep={"last": 2, "best": 1},
    )  # fmt: skip
    callback.extras = CheckpointExtras(config_toml="", meta={})
    module = torch.nn.Linear(2, 2)
    saved: list[Path] = []
    trainer = SimpleNamespace(
        lightning_module=module,
        global_step=7,
        save_checkpoint=lambda path, weights_only=False: saved.append(path),
    )
    write = callback._writer(trainer)  # type: ignore[arg-type]
    write(tmp_path / last_name(6))
    assert saved == [tmp_path / last_name(6)]
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="weights became NaN or inf by step 7"):
        write(tmp_path / last_name(7))
    assert saved == [tmp_path / last_name(6)]


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


# --------------------------------------------------------------------------- token ids


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path: Path) -> None:
    from ml_playground.data import GPTDataModule

    meta = {"vocab_size": 10, "dtype": "uint16", "stoi": {}, "itos": {}}
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    np.array([1, 2, 3, 40, 5] * 10, dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.array([1, 2, 3, 4, 5] * 10, dtype=np.uint16).tofile(tmp_path / "val.bin")
    with pytest.raises(DataError, match=r"train\.bin"):
        GPTDataModule(
            dataset_dir=tmp_path,
            batch_size=2,
            block_size=4,
            val_batches=1,
            num_workers=0,
            pin_memory=False,
        )
