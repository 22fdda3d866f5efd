"""Checkpoint policy (names, windows, when to write), atomic writes, and checkpoint validation.

Files: `ckpt_last_XXXXXXXX.pt` and `ckpt_best_XXXXXXXX_<metric>=<value>.pt`, XXXXXXXX the
optimizer step. `keep.last` / `keep.best` are independent windows; rotation deletes only these
files and only right after writing one.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ml_playground.errors import CheckpointError, ConfigError

FORMAT_VERSION = 1
SECTION = "ml_playground"  # the project's own part of a Lightning checkpoint
REQUIRED_KEYS = ("state_dict", "global_step", SECTION)
SECTION_KEYS = ("format_version", "model_args", "config_toml", "meta")

LAST_PATTERN = re.compile(r"^ckpt_last_(\d{8})\.pt$")
BEST_PATTERN = re.compile(r"^ckpt_best_(\d{8})_.*\.pt$")
TMP_PATTERN = re.compile(r"^\.ckpt_(last|best)_.*\.tmp-\d+$")


def last_name(step: int) -> str:
    return f"ckpt_last_{step:08d}.pt"


def best_name(step: int, metric: str, value: float) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", metric)
    return f"ckpt_best_{step:08d}_{slug}={value:.4f}.pt"


def managed_files(dirpath: Path, kind: str) -> list[Path]:
    """This kind's checkpoint files in the folder, oldest step first."""
    pattern = LAST_PATTERN if kind == "last" else BEST_PATTERN
    if not dirpath.is_dir():
        return []
    found = [p for p in dirpath.iterdir() if pattern.match(p.name)]
    return sorted(found, key=lambda p: (int(p.name.split("_")[2][:8]), p.name))


def find_checkpoint(dirpath: Path, which: str) -> Path:
    """Resolve `last` / `best` to the file with the highest step, or check a given file."""
    if which in ("last", "best"):
        files = managed_files(dirpath, which)
        if not files:
            raise CheckpointError(
                f"{dirpath}: no ckpt_{which}_* checkpoint found; train first with "
                f"`ml-playground fit --config ...`" + (" or use `last`" if which == "best" else "")
            )
        return files[-1]
    path = Path(which)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same folder, then renames: no partial final files."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class CheckpointExtras:
    """What makes a checkpoint self-contained: the resolved config and the tokenizer."""

    config_toml: str
    meta: dict[str, Any]


class GPTCheckpoint(ModelCheckpoint):
    """The project's checkpoint policy on top of Lightning's ModelCheckpoint.

    - `last` at step 0 (before the first step), every `every_n_steps`, and at the end;
    - `best` whenever the monitored metric improves, written before `last` of the same step
      so the file resumed from carries the up-to-date best score.
    """

    def __init__(
        self,
        dirpath: Path,
        every_n_steps: int,
        metric: str,
        mode: str,
        keep_last: int,
        keep_best: int,
        extras: CheckpointExtras,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            monitor=metric,
            mode=mode,
            save_top_k=keep_best,
            save_last=False,
            every_n_train_steps=0,
            every_n_epochs=0,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        self.dir = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.keep_last, self.keep_best = keep_last, keep_best
        self.extras = extras
        self.best_step = -1
        self.last_saved_step = -1
        self._pending_last: int | None = None
        self._last_files: list[Path] = []
        self._best_files: list[Path] = []

    @property
    def state_key(self) -> str:
        # Fixed, so changing metric/mode/interval between runs cannot drop the saved state.
        return "GPTCheckpoint"

    # ----------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.dirpath = str(self.dir)
        if stage != TrainerFn.FITTING:
            return
        if trainer.is_global_zero:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.iterdir():  # left by a process killed mid-write
                if TMP_PATTERN.match(stale.name):
                    stale.unlink(missing_ok=True)
        # Adopt what is already there (a resumed run), so the windows continue from it.
        self._last_files = managed_files(self.dir, "last")
        self._best_files = managed_files(self.dir, "best")
        if self.keep_last == 0 and self.keep_best == 0 and trainer.is_global_zero:
            warnings.warn(
                "checkpointing.keep.last and keep.best are both 0: no checkpoint is written "
                "and this run cannot be resumed",
                stacklevel=1,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            self._save_last(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._flush_last(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self.last_saved_step:
            # Deferred: a validation may follow at this step, and best goes before last.
            self._pending_last = step

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ConfigError(
                f"checkpointing.metric = {self.monitor!r} was not logged; choose one of "
                f"{', '.join(sorted(metrics))}"
            )
        value = float(metrics[self.monitor])
        if self._improved(value):
            self.best_model_score = torch.tensor(value)
            self.best_step = trainer.global_step
            if self.keep_best > 0:
                path = self.dir / best_name(trainer.global_step, self.monitor or "", value)
                self._write(trainer, path)
                self._best_files = self._rotate(trainer, self._best_files, path, self.keep_best)
                self.best_model_path = str(path)
        self._flush_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_last(trainer)
        if self.last_saved_step != trainer.global_step:
            self._save_last(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Ctrl-C / SIGTERM: keep the work done so far (at the current step) resumable.
        interrupted = isinstance(exception, KeyboardInterrupt | SIGTERMException)
        if (
            interrupted
            and trainer.state.fn == TrainerFn.FITTING
            and self.last_saved_step != trainer.global_step
        ):
            self._save_last(trainer)

    def state_dict(self) -> dict[str, Any]:
        score = self.best_model_score
        return {
            "metric": self.monitor,
            "mode": self.mode,
            "best_score": None if score is None else float(score),
            "best_step": self.best_step,
            "best_path": self.best_model_path,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("metric") != self.monitor or state_dict.get("mode") != self.mode:
            return  # another metric: its best score means nothing for this one
        score = state_dict.get("best_score")
        self.best_model_score = None if score is None else torch.tensor(score)
        self.best_step = int(state_dict.get("best_step", -1))
        self.best_model_path = str(state_dict.get("best_path", ""))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[SECTION] = {
            "format_version": FORMAT_VERSION,
            "model_args": dict(getattr(pl_module, "model_args", {})),
            "config_toml": self.extras.config_toml,
            "meta": self.extras.meta,
        }

    # ----------------------------------------------------------------- policy

    def _improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_model_score is None:
            return True
        best = float(self.best_model_score)
        return value < best if self.mode == "min" else value > best

    def _flush_last(self, trainer: pl.Trainer) -> None:
        if self._pending_last is not None and self._pending_last == trainer.global_step:
            self._save_last(trainer)
        self._pending_last = None

    def _save_last(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        self.last_saved_step = step
        self._pending_last = None
        if self.keep_last == 0:
            return
        path = self.dir / last_name(step)
        self._write(trainer, path)
        self._last_files = self._rotate(trainer, self._last_files, path, self.keep_last)
        self.last_model_path = str(path)

    def _write(self, trainer: pl.Trainer, path: Path) -> None:
        trainer.save_checkpoint(path, weights_only=False)  # collective under DDP; rank 0 writes

    def _rotate(self, trainer: pl.Trainer, files: list[Path], new: Path, keep: int) -> list[Path]:
        files = [p for p in files if p != new] + [new]
        doomed, kept = files[:-keep], files[-keep:]
        if trainer.is_global_zero:
            for path in doomed:
                path.unlink(missing_ok=True)
        return kept


# --------------------------------------------------------------------------- loading


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint safely (weights_only) and check it is one of ours, of a known version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a pickle, disallowed global, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or not a checkpoint: {reason[:120]}); "
            "use another ckpt_last_* / ckpt_best_* file"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not an ml-playground checkpoint (not a dict)")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path}: not an ml-playground checkpoint (missing {', '.join(missing)})"
        )
    section = checkpoint[SECTION]
    version = section.get("format_version") if isinstance(section, dict) else None
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: checkpoint has no format version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this ml-playground supports "
            f"({FORMAT_VERSION}); upgrade ml-playground"
        )
    missing = [key for key in SECTION_KEYS if key not in section]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return checkpoint


def check_compatible(
    path: Path, checkpoint: dict[str, Any], model_args: dict[str, Any], vocab_size: int
) -> None:
    """Refuse to resume a checkpoint whose model shape or vocabulary differs from the run's."""
    stored = checkpoint[SECTION]["model_args"]
    if stored.get("vocab_size") != vocab_size:
        raise CheckpointError(
            f"{path}: vocabulary of {stored.get('vocab_size')} tokens, but the dataset's "
            f"meta.pkl has {vocab_size}; resume with the dataset it was trained on"
        )
    for key in ("n_layer", "n_head", "n_embd", "block_size", "bias"):
        if stored.get(key) != model_args.get(key):
            raise CheckpointError(
                f"{path}: model.{key} is {stored.get(key)!r} in the checkpoint but "
                f"{model_args.get(key)!r} in the config; use the checkpoint's model settings"
            )
