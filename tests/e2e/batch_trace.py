"""A callback the end-to-end tests add to a real run with `--trainer.callbacks+=`, as a user
would add their own: each rank appends, for every training batch, the optimizer step and two
checksums of the batch's tokens to `<folder>/batches-rank<N>.txt`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class BatchTrace(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        x = batch[0]
        with (self.folder / f"batches-rank{trainer.global_rank}.txt").open("a") as handle:
            handle.write(f"{trainer.global_step} {int(x.sum())} {int(x[:, 0].sum())}\n")
