"""Configuration: the whole-experiment schema and what the command line adds to jsonargparse."""

from ml_playground.configuration.loading import load_config as load_config
from ml_playground.configuration.loading import load_experiment_toml as load_experiment_toml
from ml_playground.configuration.loading import (
    load_full_experiment_config as load_full_experiment_config,
)
from ml_playground.configuration.schema import ExperimentConfig as ExperimentConfig
