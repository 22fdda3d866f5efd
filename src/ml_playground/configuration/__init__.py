"""Configuration: the whole-experiment schema, the parser and the Python API."""

from ml_playground.configuration.parser import load_config as load_config
from ml_playground.configuration.parser import load_experiment_toml as load_experiment_toml
from ml_playground.configuration.parser import (
    load_full_experiment_config as load_full_experiment_config,
)
from ml_playground.configuration.schema import ExperimentConfig as ExperimentConfig
