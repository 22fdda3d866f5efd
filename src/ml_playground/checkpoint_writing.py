"""Checkpoint policy (names, windows, when to write) and atomic writes, as Lightning callbacks
and plugins; finding, reading and validating files is in `checkpoint_reading.py`.

Files: `ckpt_last_XXXXXXXX.pt` and `ckpt_best_XXXXXXXX_<metric>=<value>.pt`, XXXXXXXX the
optimizer step. `keep.last` / `keep.best` are independent windows; rotation deletes only these
files, only right after writing one (or, on resume, to finish a rotation a kill cut short).
"""

from __future__ import annotations

import random
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from pydantic import Field

from ml_playground.checkpoint_reading import (
    FORMAT_VERSION,
    SECTION,
    TMP_PATTERN,
    managed_files,
)
from ml_playground.errors import CheckpointError, ConfigError, TrainingError
from ml_playground.files import atomic_file
from ml_playground.interrupts import hold_interrupts
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


@dataclass
class CheckpointExtras:
    """What makes a checkpoint self-contained: the resolved config and the tokenizer."""

    config_toml: str
    meta: dict[str, Any]


class GPTCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint with the project's names and `keep` windows.

    The base class keeps monitor / mode, the best files (`best_k_models`,
    `kth_best_model_path`, `best_model_path`, `best_model_score`, `current_score`),
    `last_model_path`, the file names (`format_checkpoint_name` over the `filename` template
    and `CHECKPOINT_NAME_LAST`), deleting (`_remove_checkpoint`) and its saved state. What
    differs, member by member:

    - `FILE_EXTENSION`, `CHECKPOINT_NAME_LAST`: the names `ckpt_last_XXXXXXXX.pt` /
      `ckpt_best_XXXXXXXX_<metric>=<value>.pt`.
    - `state_key`: fixed; the base's embeds monitor, mode and interval, so changing one of
      them between runs would silently drop the saved state.
    - `setup`: also clears temporary files of a process killed mid-write; the base's
      "folder is not empty" warning is silenced (every resume starts that way).
    - `on_train_start`: also writes `last` at step 0, before the first step; continuing
      from the newest `last`, files a kill left outside the saved windows join them, and the
      `best` rotation the kill cut short is finished.
    - `on_train_batch_end`: every `every_n_steps` schedules only a `last` file; the base
      would also rank the previous validation's (stale) metric.
    - `on_train_batch_start` (a no-op in the base): writes the `last` scheduled at the step
      before when no validation followed it, and restores the checkpoint's RNG state when the
      first resumed step starts.
    - `on_validation_end`: the base's top-k save, then the scheduled `last` of this step, so
      the file resumed from carries the up-to-date best; the base writes `last` only when a
      best file was written; a metric never logged is a one-line error.
    - `on_train_epoch_end`, `on_train_end`: the final `last`, written at epoch end, before
      EMA copies the averaged weights into the model.
    - `on_exception`: Ctrl-C / SIGTERM write `last` at the current step (the base writes a
      top-k file only with `save_on_exception`).
    - `check_monitor_top_k`: a best file only when the metric improves on the best so far
      (a finite value), not whenever it enters the top k: the kept files are the newest
      improvements.
    - `_monitor_candidates`: the monitored value is rank 0's (train/loss is not synced and
      writing is collective), also under the name the `filename` template uses.
    - `_save_checkpoint`: refuses NaN/inf weights before writing.
    - `_save_last_checkpoint`: `keep.last` files instead of one.
    - `_should_remove_checkpoint`: the base never deletes the file resumed from; a run that
      continues from the newest `last` rotates it like any other (a branch point resumed from
      an older step is the newest once the later files are set aside, and keeps a hard link
      in `branch_after_<step>/`; a `best` file resumed from is kept).
    - `_find_last_checkpoints`: `trainer.fit(ckpt_path="last")` takes the highest step.
    - `state_dict` / `load_state_dict`: also the `last` window and the mode; state of another
      metric or mode is ignored (its files then stay on disk); paths follow a moved folder, and
      files no longer there leave the windows (a report never names a missing file).
    - `on_save_checkpoint` / `on_load_checkpoint`: the project's section (config, tokenizer,
      model arguments, RNG state).
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
        # The resolved config and the tokenizer, set once they are known (before training).
        self.extras = CheckpointExtras(config_toml="", meta={})
        self._last_step_written = -1
        self._pending_last: int | None = None
        self._pending_rng: dict[str, Any] | None = None
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
        if getattr(
            trainer, "fast_dev_run", False
        ):  # Lightning's smoke test writes no checkpoint, ours neither
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
        if (
            interrupted
            and trainer.state.fn == TrainerFn.FITTING
            and self._last_step_written != trainer.global_step
        ):
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

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self._refuse_non_finite(trainer, filepath)
        super()._save_checkpoint(trainer, filepath)

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
        best_first = sorted(
            self.best_k_models,
            key=lambda p: float(self.best_k_models[p]),
            reverse=self.mode == "max",
        )
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

    def _refuse_non_finite(self, trainer: pl.Trainer, path: str) -> None:
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
        good = next((p for p in reversed(self.last_k_models) if p != path), "none")
        raise TrainingError(
            f"the model weights became NaN or inf by step {trainer.global_step}; "
            f"{Path(path).name} was not written (last good checkpoint: {good}); lower "
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
