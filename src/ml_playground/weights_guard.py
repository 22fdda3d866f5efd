"""No checkpoint is ever written with NaN or inf weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from ml_playground.checkpoint_reading import managed_files
from ml_playground.errors import TrainingError


class FiniteWeights(pl.Callback):
    """Stops training instead of writing NaN/inf weights over a good window of checkpoints.

    The loss is checked only at log steps (a device sync each); the weights are checked here,
    before every checkpoint is written (Lightning calls this hook before it writes the file),
    so no checkpoint between two loss checks can hold them."""

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        with torch.no_grad():
            flags = [torch.isfinite(p).all() for p in pl_module.parameters()]
            finite = not flags or bool(torch.stack(flags).all())  # one device sync
        if finite:
            return
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        lasts = managed_files(Path(folder), "last") if folder else []
        good, step = lasts[-1] if lasts else "none", trainer.global_step
        raise TrainingError(
            f"the model weights became NaN or inf by step {step}; no checkpoint of step {step} "
            f"was written (last good checkpoint: {good}); lower model.learning_rate or set "
            "trainer.gradient_clip_val, and resume with --ckpt_path last"
        )
