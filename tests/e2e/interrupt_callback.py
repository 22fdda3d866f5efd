"""A callback the end-to-end tests add with `--trainer.callbacks+=`, as a user adds their own:
it signals its own process at a chosen moment of a chosen step, so an interrupt lands there
every time: `validation` (while that step's validation runs) or `before_validation` (the step
is trained, its validation not started)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    def __init__(self, step: int, signal_name: str = "SIGINT", moment: str = "validation") -> None:
        self.step, self.moment = step, moment
        self.number = getattr(signal, signal_name)

    def _send(self, trainer: pl.Trainer, moment: str) -> None:
        if trainer.global_step == self.step and moment == self.moment and trainer.is_global_zero:
            os.kill(os.getpid(), self.number)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self._send(trainer, "before_validation")

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if batch_idx == 1 and not trainer.sanity_checking:
            self._send(trainer, "validation")
