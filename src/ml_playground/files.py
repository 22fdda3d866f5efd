"""Writing a file so that a crash, a full disk or a kill never leaves a partial file under its
final name: the one helper behind checkpoints, prepared artifacts, downloads, sample output and
the saved configuration.

The data goes to `.<name>.tmp-<pid>` beside the target, is flushed and fsynced, then renamed
over the target; the folder is fsynced after the rename (best effort: not every filesystem
can). On any failure the temporary file is removed and the target is untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def temporary_name(path: Path) -> Path:
    """Where `path` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make renames inside `folder` durable, where the platform and filesystem allow it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_and_close(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write `path`'s content into; it replaces `path` when the block ends
    without an exception, and is removed otherwise."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            sync_and_close(handle)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes | str) -> None:
    """`path` holds exactly `data` (text as UTF-8), or is left as it was."""
    with atomic_file(path) as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
