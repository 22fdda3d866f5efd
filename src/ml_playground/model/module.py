"""The LightningModule around the plain GPT: loss, AdamW, warmup + cosine schedule, logging."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch

from ml_playground.configuration.schema import ModelConfig
from ml_playground.errors import TrainingError
from ml_playground.model.gpt import GPT, GPTConfig


class WarmupCosine:
    """LR multiplier per optimizer step: linear warmup, cosine decay to min_lr, then flat."""

    def __init__(self, warmup: int, decay: int, lr: float, min_lr: float) -> None:
        self.warmup, self.decay, self.lr, self.min_lr = warmup, decay, lr, min_lr

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if step >= self.decay:
            return self.min_lr / self.lr
        progress = (step - self.warmup) / max(1, self.decay - self.warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return (self.min_lr + cosine * (self.lr - self.min_lr)) / self.lr


def _log_interval(trainer: pl.Trainer) -> int:
    # Set by Lightning's logger connector at Trainer init; not a declared attribute.
    return max(1, int(getattr(trainer, "log_every_n_steps", 50)))


def gpt_config(model: ModelConfig, vocab_size: int) -> GPTConfig:
    return GPTConfig(
        block_size=model.block_size,
        vocab_size=vocab_size,
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_embd=model.n_embd,
        dropout=model.dropout,
        bias=model.bias,
    )


class GPTLightningModule(pl.LightningModule):
    """Trains a `GPT`; checkpoint extras (config, tokenizer) are added by the callback."""

    def __init__(self, config: ModelConfig, vocab_size: int, tokens_per_batch: int) -> None:
        super().__init__()
        self.config = config
        self.model = GPT(gpt_config(config, vocab_size))
        self.tokens_per_batch = tokens_per_batch
        # Plain types only, so the checkpoint loads with weights_only=True.
        self.save_hyperparameters({"model": config.model_dump(), "vocab_size": vocab_size})
        self._last_time: float | None = None

    @property
    def model_args(self) -> dict[str, Any]:
        return asdict(self.model.config)

    def configure_model(self) -> None:
        if self.config.compile and not getattr(self, "_compiled", False):
            # Module.compile keeps parameter names (no `_orig_mod.` prefix in checkpoints).
            self.model.compile()
            self._compiled = True

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        return self.model(idx, targets)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        _, loss = self.model(x, y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        step = self.trainer.global_step
        if step % _log_interval(self.trainer) == 0 and not torch.isfinite(loss).item():
            raise TrainingError(
                f"loss became {loss.item()} at step {step}; lower "
                "model.learning_rate or set trainer.gradient_clip_val, and resume from "
                "the last good checkpoint with --ckpt_path last"
            )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        self._val_losses.append(loss.detach())

    def on_validation_epoch_start(self) -> None:
        self._val_losses: list[torch.Tensor] = []

    def on_validation_epoch_end(self) -> None:
        # Every rank holds an equal share of the fixed windows: the mean of means is exact.
        local = torch.stack(self._val_losses).float().mean()
        gathered = self.all_gather(local)
        assert isinstance(gathered, torch.Tensor)
        loss = gathered.float().mean()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        self._val_losses.clear()
        self._last_time = None  # validation time is not training throughput

    def configure_optimizers(self) -> Any:
        cfg = self.config
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(
            self.model.configure_param_groups(cfg.weight_decay),
            lr=cfg.learning_rate,
            betas=(cfg.beta1, cfg.beta2),
            fused=fused,
        )
        schedule = WarmupCosine(cfg.warmup_steps, cfg.lr_decay_steps, cfg.learning_rate, cfg.min_lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        now = time.perf_counter()
        trainer = self.trainer
        if trainer.global_step % _log_interval(trainer) == 0:
            self.log("lr", optimizer.param_groups[0]["lr"])
            if self._last_time is not None:
                tokens = (
                    self.tokens_per_batch * trainer.accumulate_grad_batches * trainer.world_size
                )
                self.log("perf/tokens_per_sec", tokens / (now - self._last_time))
        self._last_time = now
