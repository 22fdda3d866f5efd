"""What a run logs to TensorBoard: a text sample per validation, the HPARAMS summary, and the
logger that numbers steps as the checkpoint names do."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger

from ml_playground.errors import DataError, MLPlaygroundError
from ml_playground.model.gpt import GPT
from ml_playground.prepare import Tokenizer, tokenizer_from_meta

SAMPLE_PROMPT = "\n"
SAMPLE_SEED = 1337


class TextSample(pl.Callback):
    """Logs a short generated text (fixed prompt and seed) at each validation, so a user can
    read the model learning in TensorBoard's TEXT tab."""

    def __init__(self, meta: dict[str, Any], max_new_tokens: int = 200) -> None:
        self.meta = meta
        self.tokenizer: Tokenizer | None = None  # built at the first validation, not before
        self.max_new_tokens = max_new_tokens
        self.last_text: str | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.meta:
            return
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None and not bool(torch.isfinite(loss)):
            return  # NaN weights: the checkpoint callback or the loss check says so
        boards = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not boards:
            return
        if self.tokenizer is None:
            try:
                self.tokenizer = tokenizer_from_meta(self.meta)
            except DataError as exc:  # e.g. BPE files unavailable offline: train anyway
                print(f"note: no text sample in TensorBoard: {exc}", file=sys.stderr)
                self.meta = {}
                return
        model = cast(GPT, pl_module.model)
        try:
            prompt = self.tokenizer.encode(SAMPLE_PROMPT) or [0]
        except MLPlaygroundError:  # a corpus without newlines: start from token 0 instead
            prompt = [0]
        idx = torch.tensor([prompt], dtype=torch.long, device=pl_module.device)
        generator = torch.Generator(device=pl_module.device).manual_seed(SAMPLE_SEED)
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                idx,
                self.max_new_tokens,
                temperature=0.8,
                top_k=200,
                generator=generator,
                refresh_keep=model.default_refresh_keep(),
                vocab_limit=self.tokenizer.vocab_size,
            )
        finally:
            model.train(was_training)
        self.last_text = self.tokenizer.decode(out[0].tolist())
        # Markdown would swallow newlines: show the sample as a code block.
        for board in boards:
            board.experiment.add_text("sample", f"```\n{self.last_text}\n```", trainer.global_step)


class HparamsSummary(pl.Callback):
    """At the end of training, writes the configuration with the best metric to HPARAMS."""

    def __init__(self, config: dict[str, Any], metric: str) -> None:
        self.params = _flatten(config)
        self.metric = metric

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        score = getattr(checkpoint, "best_model_score", None)
        if not trainer.is_global_zero or score is None:
            return
        best = {f"hp/best_{self.metric}": float(score)}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # its HPARAMS tab pairs them
                logger.log_hyperparams(self.params, best)
            else:
                logger.log_hyperparams(self.params)
                logger.log_metrics(best, trainer.global_step)


def completed_step(lightning_step: int) -> int:
    """The project's number for the step Lightning is running (its `global_step` inside the
    step). Lightning numbers it by the optimizer steps done before it, 0-based; checkpoint
    names, logs and reports by the steps done once it finishes, so the validation after step
    2000 and `ckpt_best_00002000_*` agree. The one place the two numberings meet."""
    return lightning_step + 1


class StepAlignedLogger(TensorBoardLogger):
    """TensorBoard logger whose steps are optimizer steps completed, as in checkpoint names.

    Lightning logs what happens during step k (1-based) at k - 1, so `val/loss` of the
    validation after step 2000 would sit at 1999 beside `ckpt_best_00002000_*`. Its
    `epoch` scalar (always 0 for an endless stream) is dropped.
    """

    def _get_next_version(self) -> int:
        """The next free version_N, taken by creating its folder: two runs of one experiment
        started at the same moment would otherwise both pick the same N."""
        version = super()._get_next_version()
        if getattr(rank_zero_only, "rank", 0) != 0:  # only rank 0 writes logs
            return version
        while True:
            try:
                Path(self.root_dir, f"version_{version}").mkdir(parents=True)
                return version
            except FileExistsError:
                version += 1

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        if metrics:
            super().log_metrics(metrics, None if step is None else completed_step(step))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
