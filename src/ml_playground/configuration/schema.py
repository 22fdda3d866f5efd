"""The whole experiment: every section of the TOML file, validated together by every command.

The sections are the init arguments of the classes they configure and live beside them; this
module adds the top-level keys and the rules that span sections. Defaults: `default.toml`.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, model_validator

from ml_playground.checkpoint_writing import CheckpointingConfig
from ml_playground.data import DataConfig
from ml_playground.evaluation import EvaluateConfig
from ml_playground.module import ModelConfig
from ml_playground.prepare.config import PrepareConfig
from ml_playground.sampling import SampleConfig  # the sections, beside the classes they configure
from ml_playground.sections import AnchoredPath, Section, Seed

# Trainer arguments the project sets itself: a user value would silently fight ours.
MANAGED_TRAINER_KEYS = {
    "plugins": "ml-playground installs its own checkpoint I/O plugin",
    "enable_checkpointing": "use [checkpointing] keep.last / keep.best (0 disables a kind)",
    "default_root_dir": "use log_dir and checkpointing.dirpath",
}
EXPERIMENT = "{experiment}"


class ExperimentConfig(Section):
    """A whole experiment: every section of the TOML file, validated together."""

    experiment: str = Field(
        description="name of the run, used for log and checkpoint folders",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
    )
    seed_everything: Seed = Field(description="global random seed (torch, numpy, python, data)")
    log_dir: AnchoredPath = Field(
        description="TensorBoard logs go to <log_dir>/<experiment>/version_N"
    )
    prepare: PrepareConfig
    data: DataConfig
    model: ModelConfig
    trainer: dict[str, Any] = Field(
        description="keyword arguments of lightning.Trainer (checked by jsonargparse against its signature)"
    )
    checkpointing: CheckpointingConfig
    sample: SampleConfig
    evaluate: EvaluateConfig

    @model_validator(mode="before")
    @classmethod
    def _name_paths(cls, data: Any) -> Any:
        """ "{experiment}" in the folders becomes the experiment's name."""
        if not isinstance(data, dict) or not isinstance(data.get("experiment"), str):
            return data
        name, data = data["experiment"], dict(data)
        folders = (("", "log_dir"), ("data", "dataset_dir"), ("checkpointing", "dirpath"))
        for section, key in (*folders, ("sample", "output"), ("evaluate", "output")):
            table = dict(data.get(section) or {}) if section else data
            if isinstance(table.get(key), str | os.PathLike):
                table[key] = os.fspath(table[key]).replace(EXPERIMENT, name)
                if section:
                    data[section] = table
        return data

    @model_validator(mode="after")
    def _check_across_sections(self) -> ExperimentConfig:
        if self.data.block_size > self.model.block_size:
            raise ValueError(
                f"data.block_size ({self.data.block_size}) exceeds the model's context "
                f"model.block_size ({self.model.block_size})"
            )
        accumulate = self.trainer.get("accumulate_grad_batches", 1)
        interval = self.trainer.get("val_check_interval")
        if (
            isinstance(accumulate, int)
            and isinstance(interval, int)
            and not isinstance(interval, bool)
            and accumulate > 1
            and interval % accumulate
        ):
            # Lightning counts val_check_interval in micro-batches: a validation (and a best
            # checkpoint) in the middle of an accumulated step could not be resumed exactly.
            raise ValueError(
                f"trainer.val_check_interval ({interval}) counts micro-batches and must be a "
                f"multiple of trainer.accumulate_grad_batches ({accumulate}); for a validation "
                f"every N optimizer steps use N x {accumulate}"
            )
        return self

    @property
    def dry_run(self) -> bool:
        """`trainer.fast_dev_run`: Lightning's smoke test, which writes no checkpoint or log; it
        may run beside a fit in the same folder and over an earlier run's checkpoints."""
        return self.trainer.get("fast_dev_run") not in (None, False, 0)
