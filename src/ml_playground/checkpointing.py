"""Checkpoint policy (windows, when to write) and atomic writes, as Lightning callbacks and
plugins; file names, reading and validation are in `checkpoint_files.py`.

Files: `ckpt_last_XXXXXXXX.pt` and `ckpt_best_XXXXXXXX_<metric>=<value>.pt`, XXXXXXXX the
optimizer step. `keep.last` / `keep.best` are independent windows; rotation deletes only these
files and only right after writing one.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from pydantic import Field

from ml_playground.checkpoint_files import (
    FORMAT_VERSION,
    SECTION,
    TMP_PATTERN,
    best_name,
    last_name,
    managed_files,
)
from ml_playground.errors import CheckpointError, ConfigError, TrainingError
from ml_playground.files import atomic_file
from ml_playground.settings import AnchoredPath, Section


class KeepConfig(Section):
    """How many checkpoint files of each kind stay on disk (0 disables that kind)."""

    last: int = Field(description="ckpt_last_* files kept (the newest)", ge=0)
    best: int = Field(description="ckpt_best_* files kept (the best)", ge=0)


class CheckpointingConfig(Section):
    """Where checkpoints go, when they are written and how many are kept."""

    dirpath: AnchoredPath = Field(description="checkpoint folder ({experiment} is replaced)")
    every_n_steps: int = Field(description="write a last checkpoint every N optimizer steps", gt=0)
    metric: str = Field(description="logged metric that decides the best checkpoint")
    mode: Literal["min", "max"] = Field(description="whether a lower or a higher metric is better")
    patience: int = Field(
        description="stop training when the metric has not improved for this many "
        "validations (the best checkpoint stays); 0 disables early stopping",
        ge=0,
    )
    keep: KeepConfig


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the same folder, then renames: no partial final files."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_file(path) as handle:
                torch.save(checkpoint, handle)
        except BaseException as exc:
            cause = _os_error(exc)
            if cause is None:
                raise
            # Disk full, file too large, I/O error: the earlier files were never touched.
            raise CheckpointError(
                f"could not write checkpoint {path}: {cause.strerror or cause}; no partial "
                f"file was left and the checkpoints already in {path.parent} are intact; "
                "free some space and resume with --ckpt_path last"
            ) from None


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write (torch's zip writer re-raises it as RuntimeError)."""
    seen: BaseException | None = exc
    while seen is not None and isinstance(seen, Exception):
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class RetentionWindows:
    """The `keep.last` / `keep.best` windows over one folder, independent of Lightning.

    `write` callbacks do the actual saving; this class decides names, when a best file is due,
    and which older files of the same kind to delete right after a write.
    """

    def __init__(
        self, dirpath: Path, keep_last: int, keep_best: int, metric: str, mode: str
    ) -> None:
        self.dir = Path(dirpath)
        self.keep_last, self.keep_best = keep_last, keep_best
        self.metric, self.mode = metric, mode
        self.best_score: float | None = None
        self.best_step = -1
        self.last_files: list[Path] = []
        self.best_files: list[Path] = []

    def adopt(self) -> None:
        """Continue the windows from the files already in the folder (a resumed run)."""
        self.last_files = managed_files(self.dir, "last")
        self.best_files = managed_files(self.dir, "best")

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_score is None:
            return True
        return value < self.best_score if self.mode == "min" else value > self.best_score

    def save_last(
        self, step: int, write: Callable[[Path], None], delete: bool = True
    ) -> Path | None:
        if self.keep_last == 0:
            return None
        path = self.dir / last_name(step)
        write(path)
        self.last_files = _rotate(self.last_files, path, self.keep_last, delete)
        return path

    def offer_best(
        self, step: int, value: float, write: Callable[[Path], None], delete: bool = True
    ) -> Path | None:
        """Record `value`; write a best file when it improves on the best so far."""
        if not self.improved(value):
            return None
        self.best_score, self.best_step = value, step
        if self.keep_best == 0:
            return None
        path = self.dir / best_name(step, self.metric, value)
        write(path)
        self.best_files = _rotate(self.best_files, path, self.keep_best, delete)
        return path


def _rotate(files: list[Path], new: Path, keep: int, delete: bool) -> list[Path]:
    files = [p for p in files if p != new] + [new]
    doomed, kept = files[:-keep], files[-keep:]
    if delete:
        for path in doomed:
            path.unlink(missing_ok=True)
    return kept


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

    def __init__(self, **checkpointing: Any) -> None:
        """`checkpointing` holds the `[checkpointing]` settings (`CheckpointingConfig`)."""
        settings = CheckpointingConfig(**checkpointing)
        dirpath, keep = settings.dirpath, settings.keep
        super().__init__(
            dirpath=dirpath,
            monitor=settings.metric,
            mode=settings.mode,
            save_top_k=keep.best,
            save_last=False,
            every_n_train_steps=0,
            every_n_epochs=0,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        self.settings = settings
        self.dir = Path(dirpath)
        self.every_n_steps = settings.every_n_steps
        self.windows = RetentionWindows(
            self.dir, keep.last, keep.best, settings.metric, settings.mode
        )
        # The resolved config and the tokenizer, set once they are known (before training).
        self.extras = CheckpointExtras(config_toml="", meta={})
        self.last_saved_step = -1
        self._pending_last: int | None = None
        self._pending_rng: dict[str, Any] | None = None

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
        self.windows.adopt()
        if self.windows.keep_last == 0 and self.windows.keep_best == 0 and trainer.is_global_zero:
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
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None
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
        # The stream is endless: the epoch ends only when training stops (max_steps, early
        # stopping). Write the final `last` here, not in on_train_end: by then EMA has copied
        # the averaged weights into the model, and the file would lose the raw ones.
        self._flush_last(trainer)
        if self.last_saved_step != trainer.global_step:
            self._save_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ConfigError(
                f"checkpointing.metric = {self.monitor!r} was not logged; choose one of "
                f"{', '.join(sorted(metrics))}"
            )
        # Every rank must take the same decision: writing is collective. val/loss is synced
        # across ranks, but a metric such as train/loss is each rank's own: use rank 0's.
        value = float(trainer.strategy.broadcast(float(metrics[self.monitor]), src=0))
        if self.windows.improved(value):
            self.best_model_score = torch.tensor(value)
        path = self.windows.offer_best(
            trainer.global_step, value, self._writer(trainer), delete=trainer.is_global_zero
        )
        if path is not None:
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
        return {
            "metric": self.monitor,
            "mode": self.mode,
            "best_score": self.windows.best_score,
            "best_step": self.windows.best_step,
            "best_path": self.best_model_path,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("metric") != self.monitor or state_dict.get("mode") != self.mode:
            return  # another metric: its best score means nothing for this one
        score = state_dict.get("best_score")
        self.windows.best_score = None if score is None else float(score)
        self.best_model_score = None if score is None else torch.tensor(score)
        self.windows.best_step = int(state_dict.get("best_step", -1))
        self.best_model_path = str(state_dict.get("best_path", ""))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[SECTION] = {
            "format_version": FORMAT_VERSION,
            "model_args": dict(getattr(pl_module, "model_args", {})),
            "config_toml": self.extras.config_toml,
            "meta": self.extras.meta,
            "rng": capture_rng(),
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Applied when the first resumed step starts, after Lightning's own start-up work
        # (which draws from the generators) is done.
        self._pending_rng = checkpoint.get(SECTION, {}).get("rng")

    # ----------------------------------------------------------------- policy

    def _flush_last(self, trainer: pl.Trainer) -> None:
        if self._pending_last is not None and self._pending_last == trainer.global_step:
            self._save_last(trainer)
        self._pending_last = None

    def _save_last(self, trainer: pl.Trainer) -> None:
        self.last_saved_step = trainer.global_step
        self._pending_last = None
        path = self.windows.save_last(
            trainer.global_step, self._writer(trainer), delete=trainer.is_global_zero
        )
        if path is not None:
            self.last_model_path = str(path)

    def _writer(self, trainer: pl.Trainer) -> Callable[[Path], None]:
        # Collective under DDP: every rank calls it, rank 0 writes.
        def write(path: Path) -> None:
            self._refuse_non_finite(trainer, path)
            trainer.save_checkpoint(path, weights_only=False)

        return write

    def _refuse_non_finite(self, trainer: pl.Trainer, path: Path) -> None:
        """Never write NaN/inf weights over a good window: stop training instead.

        The loss is checked only at log steps (a device sync); the weights are checked here,
        once per checkpoint write, so no checkpoint between two checks can hold NaN weights.
        """
        module = trainer.lightning_module
        if module is None:
            return
        with torch.no_grad():
            flags = [torch.isfinite(p).all() for p in module.parameters()]
            finite = not flags or bool(torch.stack(flags).all())  # one device sync
        if finite:
            return
        files = self.windows.last_files
        good = str(files[-1]) if files else "none"
        raise TrainingError(
            f"the model weights became NaN or inf by step {trainer.global_step}; "
            f"{path.name} was not written (last good checkpoint: {good}); lower "
            "model.learning_rate or set trainer.gradient_clip_val, and resume with "
            "--ckpt_path last"
        )


def capture_rng() -> dict[str, Any]:
    """Generator states as plain data and tensors, loadable with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, np.asarray(keys).tolist(), pos, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
