"""Configuration: the schema of an experiment and the one loader that merges and validates it."""

from ml_playground.configuration.loading import (
    dump_toml,
    load_config,
    load_experiment_toml,
    load_full_experiment_config,
)
from ml_playground.configuration.schema import ExperimentConfig

__all__ = [
    "ExperimentConfig",
    "dump_toml",
    "load_config",
    "load_experiment_toml",
    "load_full_experiment_config",
]
