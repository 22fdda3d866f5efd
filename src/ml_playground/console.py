"""What a run prints: one line per validation while it trains, the progress bar, the
closing summary and the line an interrupt ends with."""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from ml_playground.checkpoint_reading import file_step, managed_files
from ml_playground.checkpoint_writing import GPTCheckpoint
from ml_playground.configuration.schema import ExperimentConfig
from ml_playground.errors import Interrupted

SEPARATOR = "-" * 40


@dataclass
class RunResult:
    """What a `fit` or `validate` run leaves behind, for the closing report."""

    log_dir: Path | None
    tensorboard_dir: Path | None
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_score: float | None
    metric: str
    metrics: dict[str, float]
    is_global_zero: bool
    stopped_early: bool = False


class ReportValidation(pl.Callback):
    """One line per validation, as nanoGPT prints them, kept in the terminal's history. Scores
    of the same step (HellaSwag's, `add_scores`) join its line; a step scored without a
    validation gets a line of its own."""

    def __init__(self) -> None:
        self._since: tuple[int, float] | None = None
        self._scores: tuple[int, dict[str, float]] | None = None  # not printed yet

    def add_scores(self, step: int, scores: dict[str, float]) -> None:
        """Figures of `step`, printed with its validation's line (or alone, before the next
        step starts)."""
        self._scores = (step, scores)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = (trainer.global_step, time.perf_counter())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self._since is None:
            return
        metrics = trainer.callback_metrics
        parts = [f"step {trainer.global_step}:"]
        parts += [
            f"{name} {float(metrics[name]):.4f}"
            for name in ("train/loss", "val/loss")
            if name in metrics
        ]
        parts += self._take_scores(trainer.global_step)
        step0, t0 = self._since
        if trainer.global_step > step0:
            ms = 1000 * (time.perf_counter() - t0) / (trainer.global_step - step0)
            parts.append(f"({ms:.1f} ms/step)")
        self._print(trainer, " ".join(parts))
        self._since = (trainer.global_step, time.perf_counter())

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._print_scores_alone(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print_scores_alone(trainer)

    def _take_scores(self, step: int) -> list[str]:
        if self._scores is None or self._scores[0] != step:
            return []
        scores, self._scores = self._scores[1], None
        return [f"{name} {value:.4f}" for name, value in scores.items()]

    def _print_scores_alone(self, trainer: pl.Trainer) -> None:
        if self._scores is not None and trainer.is_global_zero:
            step = self._scores[0]
            self._print(trainer, " ".join([f"step {step}:", *self._take_scores(step)]))
        self._scores = None

    @staticmethod
    def _print(trainer: pl.Trainer, line: str) -> None:
        bar = trainer.progress_bar_callback
        if bar is not None and hasattr(bar, "print"):
            bar.print(line)
        else:
            print(line, flush=True)


def run_result(trainer: pl.Trainer, cfg: ExperimentConfig) -> RunResult:
    checkpoint = next(c for c in trainer.callbacks if isinstance(c, GPTCheckpoint))  # type: ignore[attr-defined]
    score = checkpoint.best_model_score
    boards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    log_dir = trainer.log_dir if trainer.logger is not None else None
    return RunResult(
        log_dir=Path(log_dir) if log_dir else None,
        tensorboard_dir=Path(boards[0].log_dir).parent if boards else None,
        last_checkpoint=Path(checkpoint.last_model_path) if checkpoint.last_model_path else None,
        best_checkpoint=Path(checkpoint.best_model_path) if checkpoint.best_model_path else None,
        best_score=None if score is None else float(score),
        metric=cfg.checkpointing.metric,
        metrics={k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        is_global_zero=trainer.is_global_zero,
        stopped_early=any(
            isinstance(cb, EarlyStopping) and cb.wait_count >= cb.patience
            for cb in trainer.callbacks  # type: ignore[attr-defined]
        ),
    )


def interrupted(trainer: pl.Trainer, sigterm: bool) -> Interrupted:
    """The line for a fit stopped by Ctrl-C or SIGTERM: which checkpoint holds the run (the
    callback wrote `last` at the current step) and how to resume it."""
    # The files on disk: a signal in the middle of a write leaves the callback naming a file
    # that was never completed.
    folder = Path(str(getattr(trainer.checkpoint_callback, "dirpath", "")))
    last, best = (managed_files(folder, kind) for kind in ("last", "best"))
    step = trainer.global_step
    how = "stopped by SIGTERM" if sigterm else "interrupted (Ctrl-C)"
    if last:
        where = f"{last[-1]} holds step {file_step(last[-1])}; resume with --ckpt_path last"
    elif best:
        where = (
            f"checkpointing.keep.last is 0, so no checkpoint holds step {step}; the best so far "
            f"is {best[-1]}: resume from it with --ckpt_path best"
        )
    else:
        where = "no checkpoint was kept (checkpointing.keep.last and keep.best are 0)"
    return Interrupted(f"{how} at step {step}; {where}", sigterm)


def report_fit(result: RunResult, cfg: ExperimentConfig) -> None:
    """What `fit` prints at the end (rank 0): best metric and file, last file, logs."""
    if not result.is_global_zero:
        return
    print(SEPARATOR)
    if result.stopped_early:
        print(
            f"stopped early: {result.metric} did not improve for "
            f"{cfg.checkpointing.patience} validation(s)"
        )
    if result.best_score is not None:
        where = result.best_checkpoint or "(not kept: checkpointing.keep.best = 0)"
        print(f"best {result.metric}: {result.best_score:.4f}  {where}")
    if result.last_checkpoint:
        print(f"last checkpoint: {result.last_checkpoint}")
    if result.log_dir:
        print(f"logs: {result.log_dir}")
    if result.tensorboard_dir:
        print(tensorboard_hint(result.tensorboard_dir))
    if cfg.dry_run:
        print("trainer.fast_dev_run: a smoke test; no checkpoint or log was written")


def tensorboard_hint(log_dir: Path) -> str:
    """The command that shows the run's logs, quoted so it can be pasted into a shell."""
    return f"tensorboard --logdir {shlex.quote(str(log_dir))}"


def report_validate(result: RunResult) -> None:
    if result.is_global_zero:
        for name, value in sorted(result.metrics.items()):
            print(f"{name}: {value:.4f}")


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, refreshed every few steps, without the logger version number."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
