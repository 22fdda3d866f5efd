"""`model.optimizer = "muon"` through the command line: fine-tuning a checkpoint with gradient
accumulation, clipping and bf16, then export. Exact resume is in test_resume_and_faults.py,
DDP in test_distributed.py, the parameter split in tests/test_optimizers.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from e2e.harness import Trained
from ml_playground.checkpoint_reading import SECTION
from test_export import same_logits


def test_muon_fine_tunes_a_checkpoint_with_accumulation_clipping_and_bf16_then_exports(
    tmp_path: Path, trained: Trained, cli
) -> None:
    source = trained.ckpt / "ckpt_last_00000020.pt"
    flags = trained.fit_flags(tmp_path)
    result = cli(
        "fit", *flags, "--model.optimizer", "muon", "--model.muon_lr", "0.01",
        "--model.init_from", source, "--trainer.accumulate_grad_batches", "2",
        "--trainer.gradient_clip_val", "0.5", "--trainer.precision", "bf16-mixed",
        "--trainer.max_steps", "6", "--trainer.val_check_interval", "12",
        "--checkpointing.every_n_steps", "3", cwd=tmp_path,
    )  # fmt: skip
    assert "best val/loss" in result.stdout
    last = tmp_path / "ckpt" / "ckpt_last_00000006.pt"  # 6 optimizer steps of 2 batches each
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [(g["optimizer"], g["initial_lr"]) for g in groups] == [
        ("muon", 0.01),
        ("adamw", 1e-2),  # the tiny experiment's learning_rate
        ("adamw", 1e-2),
    ]

    events = EventAccumulator(str(tmp_path / "logs" / "tiny" / "version_0"), {"scalars": 0})
    events.Reload()
    assert {"lr", "lr/muon", "train/grad_norm"} <= set(events.Tags()["scalars"])
    muon_lr = {e.step: e.value for e in events.Scalars("lr/muon")}
    adamw_lr = {e.step: e.value for e in events.Scalars("lr")}
    assert sorted(muon_lr) == sorted(adamw_lr) and len(muon_lr) >= 5
    for step, value in muon_lr.items():  # one schedule, two peaks
        assert value / 0.01 == pytest.approx(adamw_lr[step] / 1e-2, rel=1e-6)
    # The run started from the trained weights: its first loss is far below a fresh model's.
    first = min(events.Scalars("train/loss"), key=lambda e: e.step).value
    vocab = checkpoint[SECTION]["model_args"]["vocab_size"]
    assert first < math.log(vocab) - 0.5

    out = tmp_path / "hf"
    cli("export", *flags, "--ckpt_path", "last", "--output", out, cwd=tmp_path)
    same_logits(tmp_path / "ckpt", out, vocab)
