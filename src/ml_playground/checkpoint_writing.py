"""Checkpoint policy (names, windows, when to write) and atomic writes, as Lightning callbacks
and plugins; finding, reading and validating files is in `checkpoint_reading.py`.

Files: `ckpt_last_XXXXXXXX.pt` and `ckpt_best_XXXXXXXX_<metric>=<value>.pt`, XXXXXXXX the
optimizer step. `keep.last` / `keep.best` are independent windows; rotation deletes only these
files, only right after writing one (or, on resume, to finish a rotation a kill cut short).
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from pydantic import Field

from ml_playground.checkpoint_reading import (
    TMP_PATTERN,
    managed_files,
)
from ml_playground.errors import CheckpointError, ConfigError
from ml_playground.files import atomic_file
from ml_playground.interrupts import hold_interrupts
from ml_playground.sections import AnchoredPath, Section


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


E = TypeVar("E", bound=BaseException)


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
            if _cause(exc, KeyboardInterrupt) is not None:
                # Ctrl-C inside torch.save: its zip writer's cleanup raises a RuntimeError that
                # would hide the interrupt (and the run would end with a traceback).
                raise KeyboardInterrupt from None
            cause = _cause(exc, OSError)
            if cause is None:
                raise
            # Disk full, file too large, I/O error: the earlier files were never touched.
            raise CheckpointError(
                f"could not write checkpoint {path}: {cause.strerror or cause}; no partial "
                f"file was left and the checkpoints already in {path.parent} are intact; "
                "free some space and resume with --ckpt_path last"
            ) from None


def _cause(exc: BaseException, kind: type[E]) -> E | None:
    """The `kind` behind a failed write: torch's zip writer re-raises an OSError as a
    RuntimeError, and its cleanup after a KeyboardInterrupt raises one of its own."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


_SCORE = "monitored"  # the monitored value, under a name the `filename` template can hold
_PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")


def _file_score(path: Path, metric: str) -> float | None:
    """The score in a `ckpt_best_*` file's name, if the file ranks `metric` (else None)."""
    name, _, value = path.stem.split("_", 3)[3].rpartition("=")
    try:
        score = float(value)
    except ValueError:
        return None
    return score if name == metric_slug(metric) and score == score else None  # not NaN


def metric_slug(metric: str) -> str:
    """The metric's name as it appears in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", metric)


class GPTCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with the project's names, `keep` windows and moments.

    The base keeps monitor and mode, the best files and scores, the names
    (`format_checkpoint_name`), deleting and its saved state. This class decides:

    - the names `ckpt_last_XXXXXXXX.pt` / `ckpt_best_XXXXXXXX_<metric>=<value>.pt`, and a
      fixed `state_key` (the base's embeds monitor, mode and interval: changing one between
      runs would silently drop the saved state);
    - when to write: `last` at step 0, every `every_n_steps` (after that step's validation,
      so the file resumed from carries the up-to-date best), at the end of training and on
      Ctrl-C / SIGTERM; `best` only when the metric improves on the best so far;
    - the windows: the newest `keep.last` lasts, the best `keep.best` bests; rotation deletes
      only right after a write; a run resumed from the newest `last` adopts the files a kill
      left outside the windows and finishes the rotation it cut short.

    The private ModelCheckpoint members it overrides or calls are pinned by
    tests/test_checkpointing.py::test_private_model_checkpoint_members_keep_their_signatures.
    """

    FILE_EXTENSION = ".pt"
    CHECKPOINT_NAME_LAST = "ckpt_last_{step:08d}"

    def __init__(self, **checkpointing: Any) -> None:
        """`checkpointing` holds the `[checkpointing]` settings (`CheckpointingConfig`)."""
        settings = CheckpointingConfig(**checkpointing)
        keep = settings.keep
        super().__init__(
            dirpath=settings.dirpath,
            filename=f"ckpt_best_{{step:08d}}_{metric_slug(settings.metric)}={{{_SCORE}:.4f}}",
            monitor=settings.metric,
            mode=settings.mode,
            save_top_k=keep.best,
            save_last=keep.last > 0,
            every_n_train_steps=settings.every_n_steps,
            auto_insert_metric_name=False,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
        )
        self.keep_last = keep.last
        self.last_k_models: list[str] = []  # the `last` window, oldest first
        self._last_step_written = -1
        self._pending_last: int | None = None
        self._continued: Path | None = None  # the newest `last`, when resumed from it
        self._same_ranking = False  # the loaded state ranked this metric, in this mode

    @property
    def state_key(self) -> str:
        return "GPTCheckpoint"

    # ----------------------------------------------------------------- Lightning hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*exists and is not empty")
            super().setup(trainer, pl_module, stage)
        if stage != TrainerFn.FITTING:
            return
        if getattr(trainer, "fast_dev_run", False):  # Lightning's smoke test: writes nothing
            self.save_top_k, self.save_last, self.keep_last = 0, False, 0
            return
        folder = Path(str(self.dirpath))
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.iterdir():  # left by a process killed mid-write
                if TMP_PATTERN.match(stale.name):
                    stale.unlink(missing_ok=True)
        if self.keep_last == 0 and self.save_top_k == 0 and trainer.is_global_zero:
            print(
                "note: checkpointing.keep.last and keep.best are both 0: no checkpoint is "
                "written and this run cannot be resumed",
                file=sys.stderr,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        folder = Path(str(self.dirpath))
        lasts = managed_files(folder, "last")  # trainer.ckpt_path is set now
        resumed = Path(trainer.ckpt_path).resolve() if trainer.ckpt_path else None
        self._continued = resumed if lasts and resumed == lasts[-1].resolve() else None
        if self._continued is not None:
            # The same line goes on: files a kill left between a write and its rotation (so
            # the saved windows do not know them) join the windows, and the rotation the kill
            # cut short is finished. A best newer than the newest `last` is of this line too.
            self.last_k_models = [str(p) for p in lasts]
            if self._same_ranking and self.save_top_k > 0:
                known = len(self.best_k_models)
                for path in managed_files(folder, "best"):
                    score = _file_score(path, str(self.monitor))
                    if score is not None:
                        self.best_k_models.setdefault(str(path), torch.tensor(score))
                self._trim_best(trainer, keep=max(self.save_top_k, known))
        if trainer.global_step == 0:
            self._save_last_checkpoint(trainer, {})

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._flush_last(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        step = trainer.global_step
        if step % self._every_n_train_steps == 0 and step != self._last_step_written:
            # Deferred: a validation may follow at this step, and best goes before last.
            self._pending_last = step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if self.monitor not in candidates:
            logged = sorted(set(candidates) - {"epoch", "step"})
            raise ConfigError(
                f"checkpointing.metric = {self.monitor!r} was not logged; choose one of "
                f"{', '.join(logged)}"
            )
        written = self.best_model_path
        with hold_interrupts():
            self._save_topk_checkpoint(trainer, candidates)
            if self.best_model_path != written:  # rotation deletes only right after a write
                self._trim_best(trainer, keep=self.save_top_k)
            self._flush_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The stream is endless: the epoch ends only when training stops (max_steps, early
        # stopping). Write the final `last` here, not in on_train_end: by then EMA has copied
        # the averaged weights into the model, and the file would lose the raw ones.
        self.on_train_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush_last(trainer)
        if self._last_step_written != trainer.global_step:
            self._save_last_checkpoint(trainer, {})

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Ctrl-C / SIGTERM: keep the work done so far (at the current step) resumable.
        interrupted = isinstance(exception, KeyboardInterrupt | SIGTERMException)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if interrupted and fitting and self._last_step_written != trainer.global_step:
            self._save_last_checkpoint(trainer, {})

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mode": self.mode, "last_k_models": self.last_k_models}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor") != self.monitor or state_dict.get("mode") != self.mode:
            return  # another metric: its scores mean nothing for this one
        self._same_ranking = True
        here = Path(str(self.dirpath))

        def moved(path: str) -> str:  # the folder may have been moved since
            return str(here / Path(path).name) if path else path

        def kept(path: str) -> str:  # files gone since (set aside, deleted) leave the windows
            path = moved(path)
            return path if path and Path(path).is_file() else ""

        state: dict[str, Any] = {key: kept(state_dict.get(key) or "") for key in _PATH_KEYS}
        best = {kept(p): v for p, v in state_dict["best_k_models"].items()}
        state["best_k_models"] = {p: v for p, v in best.items() if p}
        super().load_state_dict({**state_dict, **state, "dirpath": self.dirpath})
        self.last_k_models = [p for p in map(kept, state_dict.get("last_k_models", [])) if p]

    # ----------------------------------------------------------------- ModelCheckpoint members

    def check_monitor_top_k(self, trainer: pl.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is None or not bool(torch.isfinite(current)):
            return False
        if self.best_model_score is None:
            return True
        better = torch.lt if self.mode == "min" else torch.gt
        return bool(better(current, self.best_model_score))

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        if self.monitor in candidates:  # the same keys on every rank
            value = trainer.strategy.broadcast(float(candidates[self.monitor]), src=0)
            candidates[self.monitor] = candidates[_SCORE] = torch.tensor(float(value))
        return candidates

    def _save_last_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]
    ) -> None:
        self._pending_last = None
        if not self.save_last:
            self._last_step_written = trainer.global_step
            return
        step = {"step": torch.tensor(trainer.global_step)}
        path = self.format_checkpoint_name(step, self.CHECKPOINT_NAME_LAST)
        window = [p for p in self.last_k_models if p != path] + [path]
        before = self.last_k_models, self.last_model_path
        # Set before saving: they are part of the saved state.
        self.last_k_models, self.last_model_path = window[-self.keep_last :], path
        with hold_interrupts():
            try:
                self._save_checkpoint(trainer, path)
            except BaseException:  # e.g. a failed write: the windows stay as they were
                self.last_k_models, self.last_model_path = before
                raise
            self._last_step_written = trainer.global_step
            for old in window[: -self.keep_last]:
                if self._should_remove_checkpoint(trainer, old, path):
                    self._remove_checkpoint(trainer, old)

    def _should_remove_checkpoint(self, trainer: pl.Trainer, previous: str, current: str) -> bool:
        if self._continued is not None and Path(previous).resolve() == self._continued:
            return previous != current
        return super()._should_remove_checkpoint(trainer, previous, current)

    def _find_last_checkpoints(self, trainer: pl.Trainer) -> set[str]:
        lasts = managed_files(Path(str(self.dirpath)), "last")
        return {str(lasts[-1])} if lasts else set()

    # ----------------------------------------------------------------- policy

    def _flush_last(self, trainer: pl.Trainer) -> None:
        if self._pending_last is not None and self._pending_last == trainer.global_step:
            self._save_last_checkpoint(trainer, {})
        self._pending_last = None

    def _trim_best(self, trainer: pl.Trainer, keep: int) -> None:
        """Keep the `keep` best files of the window and point the base's members at them:
        after a write, when `keep.best` was lowered on resume (the window shrinks as new files
        come), and on resume, for files a kill left."""
        score = lambda path: float(self.best_k_models[path])  # noqa: E731
        best_first = sorted(self.best_k_models, key=score, reverse=self.mode == "max")
        if not best_first:
            return
        self.best_model_path = best_first[0]
        self.best_model_score = self.best_k_models[self.best_model_path]
        for path in best_first[keep:]:
            self.best_k_models.pop(path)
            if self._should_remove_checkpoint(trainer, path, self.best_model_path):
                self._remove_checkpoint(trainer, path)
        self.kth_best_model_path = best_first[:keep][-1]
        self.kth_value = self.best_k_models[self.kth_best_model_path]
