"""The experiment parser: LightningCLI in TOML mode over `GPTLightningModule` (`[model]`),
`GPTDataModule` (`[data]`), `GPTCheckpoint` (`[checkpointing]`) and the Trainer (`[trainer]`),
with `[prepare]` / `[sample]` / `[evaluate]` groups; `loading.py` orders the layers, checks
strict types and words the errors, `schema.py` validates the whole. Parsing has no side
effects: no seeding, no network, nothing built. The console script (`cli.py`) adds the
commands; the Python API (`load_config` and its two short forms) is here, below it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace, set_dumper
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ml_playground.checkpoint_writing import GPTCheckpoint
from ml_playground.configuration.loading import (
    NULL,
    TRAIN_OVERRIDES_ENV,
    Request,
    arrange,
    check_strict,
    describe_parse_error,
    dump_toml,
    leaves,
    packaged_defaults,
    validate,
)
from ml_playground.configuration.schema import MANAGED_TRAINER_KEYS, ExperimentConfig
from ml_playground.data import GPTDataModule
from ml_playground.errors import ConfigError
from ml_playground.evaluation import EvaluateConfig
from ml_playground.module import GPTLightningModule
from ml_playground.prepare.config import PrepareConfig
from ml_playground.pretrained import with_source_shape
from ml_playground.sampling import SampleConfig
from ml_playground.sections import AnchoredPath

SECTIONS = list(ExperimentConfig.model_fields)
LINK_TARGETS = ("data.seed", "model.tokens_per_batch")  # computed, not settings
set_dumper("toml", dump_toml)


class ExperimentParser(LightningCLI):
    """Parses and validates an experiment: `ExperimentParser(argv, run=False).experiment`."""

    def __init__(
        self,
        args: Sequence[str] | None = None,
        *,
        run: bool = True,
        env_vars: Sequence[str] | None = None,
        **lightning: Any,
    ) -> None:
        """`env_vars`: the override variables to read (default: the command's, `overrides`);
        `lightning`: more of LightningCLI's arguments."""
        self.env_vars = env_vars
        parser_kwargs = {"parser_mode": "toml", "exit_on_error": False}
        super().__init__(
            GPTLightningModule,
            GPTDataModule,
            parser_kwargs={**parser_kwargs, **lightning.pop("parser_kwargs", {})},
            args=list(args) if args is not None else None,
            run=run,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
            **lightning,
        )

    def overrides(self, command: str) -> Sequence[str]:
        """The override variables `command` reads (the console script's table knows)."""
        return ()

    def reads_init_from(self, command: str) -> bool:
        """Whether `command` builds the model, so `model.init_from`'s shape is fetched."""
        return False

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        options = parser._option_string_actions
        options["--config"].help = "an experiment TOML file; repeatable, later files win"
        options["--print_config"].help = "print the validated configuration as TOML and exit"
        return parser

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(
            self.trainer_class, "trainer", fail_untyped=False, instantiate=False,
            sub_configs=True, skip=set(MANAGED_TRAINER_KEYS),
        )  # fmt: skip
        parser.add_lightning_class_args(self._model_class, "model")
        parser.add_lightning_class_args(self._datamodule_class, "data")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        fields = ExperimentConfig.model_fields
        parser.add_argument("--experiment", type=str, help=fields["experiment"].description)
        parser.add_argument("--log_dir", type=AnchoredPath, help=fields["log_dir"].description)
        parser.add_class_arguments(PrepareConfig, "prepare", sub_configs=True, instantiate=False)
        parser.add_lightning_class_args(GPTCheckpoint, "checkpointing")
        parser.add_class_arguments(SampleConfig, "sample", sub_configs=True, instantiate=False)
        parser.add_class_arguments(EvaluateConfig, "evaluate", sub_configs=True, instantiate=False)
        parser.link_arguments("seed_everything", "data.seed")
        product = lambda batch, block: batch * block  # noqa: E731
        parser.link_arguments(("data.batch_size", "data.block_size"), LINK_TARGETS[1], product)
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        # Not default_config_files: jsonargparse would anchor the defaults' relative paths at
        # the package's folder instead of the working directory.
        parser.set_defaults({k: None if v == NULL else v for k, v in leaves(packaged_defaults())})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        self.argv = argv
        commands = getattr(self, "_subcommand_parsers", {})
        command = argv[0] if argv[:1] and argv[0] in commands else None
        env = self.env_vars
        if env is None:
            env = self.overrides(command) if command else ()
        self.request = arrange(argv, command, env)
        self.config = self._parse(parser, self.request)
        self.experiment = self._validate(self.request, self.config)

    def _parse(self, parser: LightningArgumentParser, request: Request) -> Namespace:
        try:
            config = parser.parse_args(request.argv)
        except ArgumentError as exc:
            message = describe_parse_error(request, exc)
            raise ConfigError(" ".join(message.split())) from None
        check_strict(request, config[request.command] if request.command else config)
        return config

    def _validate(self, request: Request, config: Namespace) -> ExperimentConfig:
        ns = config[request.command] if request.command else config
        data = ns.clone()
        for key in LINK_TARGETS:
            data.pop(key, None)
        sections = {k: v for k, v in data.as_dict().items() if k in SECTIONS}
        if request.command and self.reads_init_from(request.command):  # the source's shape
            sections = with_source_shape(sections)
        experiment = validate(request, sections)
        # The classes get, and the config saved shows, the validated values (absolute paths).
        for key, value in leaves(experiment.model_dump(exclude={"trainer"})):
            ns[key] = value
        return experiment

    def resolved_toml(self) -> str:
        """The experiment as TOML that `--config` reads back (printed, saved, checkpointed)."""
        ns = self.config[self.subcommand] if self.subcommand else self.config
        dump = self._parser(self.subcommand).dump
        text = dump(ns, format="json", skip_none=False, skip_validation=True)
        return dump_toml({k: data[k] for data in [json.loads(text)] for k in SECTIONS if k in data})

    def _set_seed(self) -> None:
        """Not at parse time (LightningCLI's): seeding belongs to building the classes."""

    def instantiate_classes(self) -> None:
        """Parsing builds nothing (a subclass that runs commands builds what they need)."""

    def _parse_ckpt_path(self) -> None:
        """Not LightningCLI's: a checkpoint's saved hyperparameters never override the config."""


def parse_only(argv: Sequence[str], env_vars: Sequence[str] = ()) -> ExperimentConfig:
    """The validated experiment of an argument list (no command); nothing is built."""
    return ExperimentParser(argv, run=False, env_vars=env_vars).experiment


def load_config(
    config_files: Sequence[str | Path] = (),
    flags: Sequence[tuple[str, str]] = (),
    env_vars: Sequence[str] = (),
) -> ExperimentConfig:
    """Defaults < config files (in order) < environment overrides < flags, validated by the
    console script's own parser (nothing is built, nothing fetched)."""
    argv = [item for path in config_files for item in ("--config", str(path))]
    return parse_only(argv + [f"--{key}={value}" for key, value in flags], env_vars)


def load_experiment_toml(path: Path) -> ExperimentConfig:
    """One experiment file over the packaged defaults, validated (no overrides)."""
    return load_config([path])


def load_full_experiment_config(
    path: Path, flags: Sequence[tuple[str, str]] = ()
) -> ExperimentConfig:
    """An experiment file with the training overrides of the environment and flags applied."""
    return load_config([path], flags, [TRAIN_OVERRIDES_ENV])
