"""The LightningModule around the plain GPT: loss, AdamW or Muon, warmup + cosine schedule,
logging."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ml_playground.checkpoint_reading import FORMAT_VERSION, SECTION
from ml_playground.errors import ConfigError, TrainingError
from ml_playground.hardware import peak_flops
from ml_playground.model.gpt import GPT, GPTConfig
from ml_playground.optimizers import MuonWithAdamW, OptimizerName, group_names
from ml_playground.sections import Pretrained, Section
from ml_playground.tensorboard_logging import completed_step


class ModelConfig(Section):
    """The GPT's shape, its optimizer and learning-rate schedule."""

    init_from: Pretrained = Field(
        description='"scratch", or the weights to start from: a Hugging Face hub id of a GPT-2 '
        "model (gpt2, gpt2-medium, gpt2-large, gpt2-xl, owner/name), a local Hugging Face "
        "GPT-2 folder, a nanoGPT ckpt.pt or an ml-playground checkpoint; its shape (n_layer, "
        "n_head, n_embd, block_size, bias, activation) replaces these settings"
    )
    activation: Literal["gelu", "gelu_tanh"] = Field(
        description='the MLP\'s GELU: "gelu" (exact, as nanoGPT) or "gelu_tanh" (GPT-2\'s)'
    )
    n_layer: int = Field(description="transformer blocks", gt=0)
    n_head: int = Field(description="attention heads per block", gt=0)
    n_embd: int = Field(description="embedding width (a multiple of n_head)", gt=0)
    block_size: int = Field(description="context length the model supports", gt=0)
    vocab_multiple_of: int = Field(
        description="round the vocabulary (from meta.pkl) up to a multiple of this for faster "
        "matmuls (GPT-2: 64 gives 50304); sampling never picks the padding tokens",
        gt=0,
    )
    dropout: float = Field(
        description="dropout probability (0 for small data / fine-tuning)", ge=0.0, lt=1.0
    )
    bias: bool = Field(description="biases in Linear and LayerNorm layers (GPT-2: true)")
    optimizer: OptimizerName = Field(
        description='"adamw": AdamW trains every weight; "muon": torch.optim.Muon trains the '
        "transformer blocks' 2-D weight matrices and AdamW the embeddings (the tied head), "
        "norms and biases"
    )
    learning_rate: float = Field(
        description="peak learning rate of AdamW (0 trains nothing: evaluation, round trips; "
        "with optimizer = muon, Muon's is muon_lr)",
        ge=0.0,
    )
    muon_lr: float = Field(
        description="peak learning rate of Muon (optimizer = muon); the schedule scales it as "
        "it scales learning_rate",
        ge=0.0,
    )
    muon_momentum: float = Field(
        description="Muon's Nesterov momentum (optimizer = muon)", ge=0.0, lt=1.0
    )
    min_lr: float = Field(description="learning rate at the end of the cosine decay", ge=0.0)
    warmup_steps: int = Field(description="optimizer steps of linear warmup", ge=0)
    lr_decay_steps: int = Field(
        description="optimizer step at which the cosine decay reaches min_lr", gt=0
    )
    weight_decay: float = Field(
        description="weight decay of the matrices and embeddings (AdamW's, and Muon's with muon)",
        ge=0.0,
    )
    beta1: float = Field(description="AdamW beta1", gt=0.0, lt=1.0)
    beta2: float = Field(description="AdamW beta2", gt=0.0, lt=1.0)
    compile: bool = Field(description="wrap the model in torch.compile")
    compile_mode: Literal[
        "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"
    ] = Field(
        description="torch.compile's mode when compile is true: reduce-overhead adds CUDA graphs "
        "(fewer kernel launches, for small models on a GPU), max-autotune searches for faster "
        "kernels (minutes of compilation)"
    )
    compile_scope: Literal["model", "blocks"] = Field(
        description="what torch.compile wraps: the whole model, or each transformer block on "
        "its own (identical blocks share one compilation: a faster start, about the same speed)"
    )
    ema_decay: float = Field(
        description="keep an exponential moving average of the weights with this decay "
        "(e.g. 0.999); validation, best checkpoints and sampling then use it; 0 disables",
        ge=0.0,
        lt=1.0,
    )

    @model_validator(mode="after")
    def _check_shape_and_schedule(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.warmup_steps > self.lr_decay_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must not exceed "
                f"lr_decay_steps ({self.lr_decay_steps})"
            )
        if self.min_lr > self.learning_rate:
            raise ValueError(
                f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})"
            )
        return self

    def peak_lr(self, optimizer: str) -> float:
        """The peak learning rate of the groups `optimizer` ("adamw" or "muon") updates."""
        return self.muon_lr if optimizer == "muon" else self.learning_rate

    def unused(self) -> dict[str, str]:
        """Settings this configuration does not use -> what uses them: a value other than the
        default for one would be ignored, so the loader refuses it, naming where it was set."""
        if self.optimizer == "muon":
            return {}
        return {key: 'model.optimizer = "muon"' for key in ("muon_lr", "muon_momentum")}


class WarmupCosine:
    """LR multiplier per optimizer step: linear warmup, cosine decay to min_lr, then flat. The
    same multiplier scales every optimizer group's peak (Muon's too): with learning_rate 0
    (AdamW trains nothing) Muon's still warms up and decays, to 0."""

    def __init__(self, warmup: int, decay: int, lr: float, min_lr: float) -> None:
        self.warmup, self.decay, self.lr, self.min_lr = warmup, decay, lr, min_lr

    def __call__(self, step: int) -> float:
        floor = self.min_lr / self.lr if self.lr else 0.0  # the end, as a fraction of the peak
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if step >= self.decay:
            return floor
        progress = (step - self.warmup) / max(1, self.decay - self.warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + cosine * (1.0 - floor)


def _refuse_unbuildable(shape: GPTConfig) -> None:
    """A model whose float32 weights alone exceed this machine's memory cannot be built (and
    one with millions of layers would take hours to try): refused before anything is built."""
    params = (
        shape.n_layer * 12 * shape.n_embd**2 + (shape.vocab_size + shape.block_size) * shape.n_embd
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * params > memory:
        raise ConfigError(
            f"model.n_layer = {shape.n_layer} and model.n_embd = {shape.n_embd} make "
            f"{params:,} parameters, {4 * params / 2**30:,.0f} GiB in float32, more than this "
            f"machine's {memory / 2**30:,.0f} GiB; lower model.n_layer or model.n_embd"
        )


def _log_interval(trainer: pl.Trainer) -> int:
    # Set by Lightning's logger connector at Trainer init; not a declared attribute.
    return max(1, int(getattr(trainer, "log_every_n_steps", 50)))


def compile_gpt(model: GPT, config: ModelConfig) -> None:
    """torch.compile as `config` says. nn.Module.compile keeps the parameter names (no
    `_orig_mod.` prefix in checkpoints)."""
    if config.compile_scope == "blocks":
        for block in model.transformer.h:
            block.compile(mode=config.compile_mode)
    else:
        model.compile(mode=config.compile_mode)


def gpt_config(model: ModelConfig, vocab_size: int) -> GPTConfig:
    multiple = model.vocab_multiple_of
    return GPTConfig(
        block_size=model.block_size,
        vocab_size=-(-vocab_size // multiple) * multiple,
        n_layer=model.n_layer,
        n_head=model.n_head,
        n_embd=model.n_embd,
        dropout=model.dropout,
        bias=model.bias,
        activation=model.activation,
    )


@dataclass
class CheckpointExtras:
    """What makes a checkpoint self-contained beside the weights: the resolved configuration
    and the tokenizer (meta.pkl), known once the classes are built."""

    config_toml: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class GPTLightningModule(pl.LightningModule):
    """Trains a `GPT`; its checkpoints carry the project's section (`on_save_checkpoint`)."""

    def __init__(self, vocab_size: int, tokens_per_batch: int, **model: Any) -> None:
        """`model` holds the `[model]` settings (`ModelConfig`); `vocab_size` (from the data's
        meta.pkl) and `tokens_per_batch` (for throughput) come from the data module."""
        super().__init__()
        config = ModelConfig(**model)
        self.config = config
        shape = gpt_config(config, vocab_size)
        _refuse_unbuildable(shape)
        self.model = GPT(shape)
        if config.init_from != "scratch":  # checked now; the weights come with load_init_from
            from ml_playground.pretrained import check_tokens, source_shape

            rows = source_shape(config.init_from)["vocab_size"]
            check_tokens(config.init_from, rows, vocab_size, self.model)
        self.tokens_per_batch = tokens_per_batch
        # Plain types only, so the checkpoint loads with weights_only=True.
        self.save_hyperparameters(
            {"model": config.model_dump(mode="json"), "vocab_size": vocab_size}
        )
        self._mark: tuple[int, float] | None = None  # (step, time) of the last log step
        self._peak_flops: float | None = None
        self.extras = CheckpointExtras()

    @property
    def model_args(self) -> dict[str, Any]:
        return asdict(self.model.config)

    def load_init_from(self) -> None:
        """Copy `model.init_from`'s weights into the model. `fit` does when it starts; a resumed
        run and `validate` take the checkpoint's weights, and never read the source's."""
        if self.config.init_from != "scratch":
            from ml_playground.pretrained import load_into

            load_into(self.model, self.config.init_from, self.hparams["vocab_size"])

    def configure_model(self) -> None:
        if self.config.compile and not getattr(self, "_compiled", False):
            compile_gpt(self.model, self.config)
            self._compiled = True

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> Any:
        return self.model(idx, targets)

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        if self.device.type == "cpu" and trainer.num_devices > 1:
            # Several processes share the cores: more threads than cores only thrash.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // trainer.num_devices))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        x, y = batch
        _, loss = self.model(x, y)
        if completed_step(self.trainer.global_step) % _log_interval(self.trainer) == 0:
            # Only on the steps Lightning writes out: self.log costs ~1 ms per call on a CPU.
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

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_idx: int
    ) -> None:
        x, y, index = batch
        logits, _ = self.model(x, y)
        # One loss per window (each has block_size targets, so their mean is the token mean).
        losses = F.cross_entropy(logits.flatten(0, 1).float(), y.reshape(-1), reduction="none")
        self._val_losses.append(losses.view(y.shape).mean(dim=1))
        self._val_index.append(index)

    def on_validation_epoch_start(self) -> None:
        self._val_losses: list[torch.Tensor] = []
        self._val_index: list[torch.Tensor] = []

    def on_validation_epoch_end(self) -> None:
        # The mean over every fixed window exactly once, whatever the number of ranks: gather
        # (index, loss) from all ranks and drop the windows DistributedSampler repeated as
        # padding. Every rank holds the same number of windows, so all_gather's shapes agree.
        losses = self.all_gather(torch.cat(self._val_losses))
        index = self.all_gather(torch.cat(self._val_index))
        assert isinstance(losses, torch.Tensor) and isinstance(index, torch.Tensor)
        losses, index = losses.reshape(-1).float(), index.reshape(-1)
        unique = torch.zeros(int(index.max()) + 1, dtype=torch.bool, device=index.device)
        unique[index] = True
        per_window = torch.zeros_like(unique, dtype=torch.float32).index_put_(
            (index,), losses
        )  # repeated windows write the same value again
        loss = per_window[unique].mean()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        self._val_losses.clear()
        self._val_index.clear()
        self._mark = None  # validation time is not training throughput

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What `sample`, `export` and a resume check read without the run's config or data.
        checkpoint[SECTION] = {
            "format_version": FORMAT_VERSION,
            "model_args": self.model_args,
            "config_toml": self.extras.config_toml,
            "meta": self.extras.meta,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before Lightning loads `state_dict`. A checkpoint written with EMA on holds the
        # averaged weights there and the raw ones in `current_model_state`; with EMA off now,
        # training must go on from the raw weights (with EMA on, its callback handles this).
        if self.config.ema_decay == 0 and "current_model_state" in checkpoint:
            checkpoint["state_dict"] = checkpoint["current_model_state"]
        self._adopt_optimizer_settings(checkpoint)

    def _schedule(self) -> WarmupCosine:
        cfg = self.config
        return WarmupCosine(cfg.warmup_steps, cfg.lr_decay_steps, cfg.learning_rate, cfg.min_lr)

    def _adopt_optimizer_settings(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run trains with this config's learning rates, schedule, betas, momentum and
        weight decay: Lightning would restore the checkpoint's along with the optimizer's
        moments. (`training.check_resume` made sure the groups are this config's.)"""
        cfg, schedule = self.config, self._schedule()
        schedulers = checkpoint.get("lr_schedulers", [])
        step = int(schedulers[0].get("last_epoch", 0)) if schedulers else 0
        for state in checkpoint.get("optimizer_states", []):
            groups, peaks = (
                state.get("param_groups", []),
                [cfg.peak_lr(n) for n in group_names(state)],
            )
            for index, (group, peak) in enumerate(zip(groups, peaks, strict=True)):
                group["lr"], group["initial_lr"] = peak * schedule(step), peak
                if group.get("optimizer", "adamw") == "adamw":
                    group["betas"] = (cfg.beta1, cfg.beta2)
                else:
                    group["momentum"] = cfg.muon_momentum
                if index < len(groups) - 1:  # all but the last decay (configure_param_groups)
                    group["weight_decay"] = cfg.weight_decay
            for sched in schedulers:
                sched["base_lrs"] = peaks
                sched["_last_lr"] = [peak * schedule(step) for peak in peaks]
                sched["lr_lambdas"] = [None] * len(peaks)  # keep this run's schedule object

    def configure_optimizers(self) -> Any:
        cfg = self.config
        groups = self.model.configure_param_groups(cfg.weight_decay, muon=cfg.optimizer == "muon")
        for group in groups:
            group["lr"] = cfg.peak_lr(group["optimizer"])
        # Fused AdamW has kernels for both; on a CPU it steps about 3x faster than the
        # per-tensor loop (1.5 -> 0.5 ms per step for the 4 x 128 recipe).
        fused = self.device.type in ("cpu", "cuda")
        adamw: dict[str, Any] = {
            "lr": cfg.learning_rate,
            "betas": (cfg.beta1, cfg.beta2),
            "fused": fused,
        }
        optimizer: torch.optim.Optimizer
        if cfg.optimizer == "muon":
            muon = {"lr": cfg.peak_lr("muon"), "momentum": cfg.muon_momentum}
            optimizer = MuonWithAdamW(groups, muon=muon, adamw=adamw)
        else:
            optimizer = torch.optim.AdamW(groups, **adamw)
        # One multiplier for every group: each goes from its own peak down to
        # min_lr / learning_rate of it.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._schedule())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def on_fit_start(self) -> None:
        self._peak_flops, name = peak_flops(self.device, str(self.trainer.precision))
        if self._peak_flops is None and self.trainer.is_global_zero:
            print(
                f"note: MFU is not logged: no peak FLOP/s known for {name} "
                "(ml_playground/hardware.py lists the known GPUs)",
                file=sys.stderr,
            )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after backward and before gradient clipping.
        now = time.perf_counter()
        trainer = self.trainer
        if trainer.global_step % _log_interval(trainer) == 0:
            lrs = {g.get("optimizer", "adamw"): g["lr"] for g in optimizer.param_groups}
            self.log("lr", lrs["adamw"])
            if "muon" in lrs:
                self.log("lr/muon", lrs["muon"])
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))
            if self._mark is not None and trainer.global_step > self._mark[0]:
                # Averaged since the previous log step (validation time excluded).
                steps = trainer.global_step - self._mark[0]
                tokens = (
                    self.tokens_per_batch * trainer.accumulate_grad_batches * trainer.world_size
                )
                rate = tokens * steps / (now - self._mark[1])
                self.log("perf/tokens_per_sec", rate, prog_bar=True)
                if self._peak_flops:
                    flops = self.model.flops_per_token() * rate / trainer.world_size
                    self.log("perf/mfu", flops / self._peak_flops)
            self._mark = (trainer.global_step, now)
