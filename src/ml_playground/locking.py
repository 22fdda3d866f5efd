"""The checkpoint folder's lock: one `fit` at a time writes there.

filelock's marker lock: `fit.lock` holds the holder's pid and host, is removed when the run
ends, and is taken over when its process is gone (a killed run) on this host.
"""

from __future__ import annotations

from pathlib import Path

from filelock import MarkerSoftFileLock, Timeout

from ml_playground.errors import CheckpointError, ConfigError

LOCK_FILENAME = "fit.lock"


class FolderLock:
    """`fit.lock` in the checkpoint folder, held while a `fit` writes there."""

    def __init__(self, dirpath: Path) -> None:
        self.dir = Path(dirpath)
        self.path = self.dir / LOCK_FILENAME
        self._lock = MarkerSoftFileLock(self.path, blocking=False)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except Timeout:
            owner = self._lock.owner
            who = f"process {owner.pid} on {owner.hostname}" if owner else "another process"
            raise CheckpointError(
                f"{self.dir} is in use by another fit ({who} holds {self.path}); wait for it "
                "to finish or use another checkpointing.dirpath; if no fit is running there, "
                f"delete {self.path}"
            ) from None
        except OSError as exc:
            # A file where the folder should be is a wrong setting, not a permission problem.
            blocker = next((p for p in (self.dir, *self.dir.parents) if p.is_file()), None)
            if blocker is not None:
                where = "is a file" if blocker == self.dir else f"is below a file ({blocker})"
                raise ConfigError(
                    f"checkpointing.dirpath = {self.dir} {where}; give the path of a folder "
                    "(an existing one or one to create)"
                ) from None
            raise CheckpointError(
                f"checkpointing.dirpath {self.dir} is not writable ({exc.strerror or exc}); "
                "fix its permissions or choose another folder"
            ) from None

    def release(self) -> None:
        if self.held:
            self._lock.release()
