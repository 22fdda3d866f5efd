"""Ctrl-C and SIGTERM stop a run between steps: a step, its validation and the checkpoints they
write finish first, so an interrupted run resumes to the same files as one never stopped.

Python raises KeyboardInterrupt wherever the program is; Lightning raises its SIGTERMException
after the step's validation, but also after any validation batch. `SigintHold` defers a Ctrl-C
to a moment of our choosing: the end of a checkpoint write and its rotation
(`hold_interrupts`), or the next training batch (`StopBetweenSteps`), which also keeps
Lightning's SIGTERM flag out of sight while a validation runs.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn


class SigintHold:
    """Between `hold()` and `release()` a Ctrl-C is recorded, not raised; `release()` hands it
    to the handler that was there before (Python's raises KeyboardInterrupt). Only on the main
    thread (the only one signals reach), and not when SIGINT is ignored or not Python's."""

    def __init__(self, note: str = "") -> None:
        self.note = note  # printed when a Ctrl-C is held, so the wait is not a mystery
        self.previous: Any = None
        self.held: list[tuple[int, Any]] = []

    @property
    def holding(self) -> bool:
        return self.previous is not None

    def hold(self) -> None:
        previous = signal.getsignal(signal.SIGINT)
        if self.holding or threading.current_thread() is not threading.main_thread():
            return
        if not callable(previous):
            return
        self.previous, self.held = previous, []
        signal.signal(signal.SIGINT, self._record)

    def _record(self, number: int, frame: Any) -> None:
        if not self.held and self.note:
            print(f"note: {self.note}", file=sys.stderr, flush=True)
        self.held.append((number, frame))

    def release(self) -> None:
        if not self.holding:
            return
        previous, self.previous = self.previous, None
        signal.signal(signal.SIGINT, previous)
        if self.held:
            previous(*self.held[0])


@contextmanager
def hold_interrupts() -> Iterator[None]:
    """Hold a Ctrl-C until the block is done: a checkpoint write and the rotation it triggers,
    so the files on disk are the windows the saved state describes (a Ctrl-C between writing a
    new best file and deleting the one it replaces would leave both)."""
    hold = SigintHold()
    hold.hold()
    try:
        yield
    finally:
        hold.release()


class StopBetweenSteps(pl.Callback):
    """From the optimizer step until the next training batch starts, a Ctrl-C waits, and a
    SIGTERM waits until the validation is over: the step's validation, its best and last
    checkpoints are written first. Otherwise the run would stop at step N without step N's
    validation, and its resume, which goes on at step N + 1, would never validate step N (its
    best checkpoint lost). The forward and backward pass of a step stay interruptible at once:
    nothing of that step is kept."""

    def __init__(self) -> None:
        self.hold = SigintHold(
            "Ctrl-C: stopping once this step's validation and checkpoints are written"
        )
        self.sigterm = False  # received during a validation, handed back when it ends

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.hold.hold()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.hold.release()  # a held Ctrl-C is raised here, between two steps

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        # Lightning checks its flag right after this hook and would stop mid-validation.
        if trainer.state.fn == TrainerFn.FITTING and trainer.received_sigterm:
            self.sigterm, trainer._signal_connector.received_sigterm = True, False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Handed back before the checkpoint callback (always the last) writes: Lightning stops
        # after this step's validation hooks, best and last included.
        if self.sigterm:
            self.sigterm, trainer._signal_connector.received_sigterm = False, True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.hold.release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.hold.held = []  # already stopping: the held Ctrl-C asked for just that
        self.hold.release()
