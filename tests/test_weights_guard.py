"""FiniteWeights refuses a checkpoint of NaN or inf weights before Lightning writes it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ml_playground.errors import TrainingError
from ml_playground.weights_guard import FiniteWeights


def test_nan_weights_stop_the_run_before_the_write(tmp_path: Path) -> None:
    (tmp_path / "ckpt_last_00000004.pt").write_bytes(b"a good one")
    module = torch.nn.Linear(2, 2)
    trainer = SimpleNamespace(global_step=6, checkpoint_callback=SimpleNamespace(dirpath=tmp_path))
    guard = FiniteWeights()
    guard.on_save_checkpoint(trainer, module, {})  # type: ignore[arg-type]  # finite: written
    with torch.no_grad():
        module.weight[0, 0] = float("inf")
    with pytest.raises(TrainingError) as refused:
        guard.on_save_checkpoint(trainer, module, {})  # type: ignore[arg-type]
    assert "became NaN or inf by step 6; no checkpoint of step 6 was written" in str(refused.value)
    assert f"last good checkpoint: {tmp_path / 'ckpt_last_00000004.pt'}" in str(refused.value)
