"""The random generators' state travels with every checkpoint, so a resumed run draws the
same dropout masks as one that never stopped."""

from __future__ import annotations

import random
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch

from ml_playground.checkpoint_reading import SECTION


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


class RandomState(pl.Callback):
    """Saves the generators' state with each checkpoint; restores it when the first resumed
    step starts, after Lightning's own start-up work, which draws from them."""

    def __init__(self) -> None:
        self.pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending = state_dict.get("rng") or self.pending

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Checkpoints written before this callback existed keep the state in the project's
        # section (load_state_dict, called after this, prefers the callback's own).
        section = checkpoint.get(SECTION)
        self.pending = section.get("rng") if isinstance(section, dict) else None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.pending is not None:
            restore_rng(self.pending)
            self.pending = None
