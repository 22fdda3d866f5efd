"""The `ml-playground` console script: a LightningCLI in TOML mode over `GPTLightningModule`
(`[model]`), `GPTDataModule` (`[data]`), `GPTCheckpoint` (`[checkpointing]`) and the Trainer
(`[trainer]`), with `[prepare]` / `[sample]` groups and the commands prepare, sample and loop.
`configuration/` orders the layers, checks strict types, words errors and validates the whole.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace, set_dumper
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ml_playground import commands, locking, reporting, training
from ml_playground.checkpoint_writing import GPTCheckpoint
from ml_playground.configuration.loading import (
    NULL,
    SAMPLE_OVERRIDES_ENV,
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
from ml_playground.errors import ConfigError, report
from ml_playground.module import CheckpointExtras, GPTLightningModule
from ml_playground.prepare.run import PrepareConfig
from ml_playground.pretrained import with_source_shape
from ml_playground.sampling import SampleConfig
from ml_playground.settings import AnchoredPath

SECTIONS = list(ExperimentConfig.model_fields)
LINK_TARGETS = ("data.seed", "model.tokens_per_batch")  # computed, not settings
BUILDS_MODEL = ("fit", "train", "validate", "loop")  # the commands that read model.init_from
set_dumper("toml", dump_toml)


class PlaygroundCLI(LightningCLI):
    """`ml-playground COMMAND --config FILE ...`; from Python `PlaygroundCLI(["fit", ...])`."""

    def __init__(
        self,
        args: Sequence[str] | None = None,
        *,
        run: bool = True,
        env_vars: Sequence[str] | None = None,
        instantiate: bool = True,
    ) -> None:
        self.env_vars, self.instantiate = env_vars, instantiate
        self.result: reporting.RunResult | None = None
        self.lock = locking.FolderLock(Path())  # the checkpoint folder's, once it is known
        try:
            super().__init__(
                GPTLightningModule,
                GPTDataModule,
                save_config_callback=training.SaveResolvedConfig,
                save_config_kwargs={"save_to_log_dir": False},
                parser_kwargs={"parser_mode": "toml", "exit_on_error": False, **commands.HELP},
                args=list(args) if args is not None else None,
                run=run,
                auto_configure_optimizers=False,
                load_from_checkpoint_support=False,
            )
        finally:
            self.lock.release()

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The commands of `commands.COMMANDS` (LightningCLI splits parser_kwargs by them)."""
        return {name: set() for name in commands.COMMANDS}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """One subcommand per entry of `commands.COMMANDS`: its function's parameters (after
        `app`) are its options, the first line of its docstring its help. (LightningCLI's own
        takes them from Trainer methods of the same names.)"""
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands()
        for name, command in commands.COMMANDS.items():
            description = (command.run.__doc__ or "").strip().splitlines()[0]
            sub = self.init_parser(**{"description": description, **kwargs.get(name, {})})
            self._add_arguments(sub)
            options = sub.add_function_arguments(command.run, as_group=False, skip={"app"})
            self._subcommand_method_arguments[name] = options
            self._subcommand_parsers[name] = sub
            subcommands.add_subcommand(name, sub, help=description)

    # ----------------------------------------------------------------- the parser

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
        parser.link_arguments("seed_everything", "data.seed")
        product = lambda batch, block: batch * block  # noqa: E731
        parser.link_arguments(("data.batch_size", "data.block_size"), LINK_TARGETS[1], product)
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        # Not default_config_files: jsonargparse would anchor the defaults' relative paths at
        # the package's folder instead of the working directory.
        parser.set_defaults({k: None if v == NULL else v for k, v in leaves(packaged_defaults())})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        named = hasattr(self, "_subcommand_parsers") and argv[:1] and argv[0] in commands.COMMANDS
        command = argv[0] if named else None
        env = self.env_vars
        if env is None:
            env = commands.COMMANDS[command].overrides if command else ()
        self.request = arrange(argv, command, env)
        self.config = self._parse(parser, self.request)
        self.experiment = self.sample_experiment = self._validate(self.request, self.config)
        self.lock = locking.FolderLock(self.experiment.checkpointing.dirpath)
        if command == "loop":  # its sampling adds the sample overrides: check both now
            second = arrange(argv, command, [TRAIN_OVERRIDES_ENV, SAMPLE_OVERRIDES_ENV])
            self.sample_experiment = self._validate(second, self._parse(parser, second))

    def _parse(self, parser: LightningArgumentParser, request: Request) -> Namespace:
        try:
            config = parser.parse_args(request.argv)
        except ArgumentError as exc:
            message = describe_parse_error(request, str(exc))
            raise ConfigError(" ".join(message.split())) from None
        check_strict(request, config[request.command] if request.command else config)
        return config

    def _validate(self, request: Request, config: Namespace) -> ExperimentConfig:
        ns = config[request.command] if request.command else config
        data = ns.clone()
        for key in LINK_TARGETS:
            data.pop(key, None)
        sections = {k: v for k, v in data.as_dict().items() if k in SECTIONS}
        if request.command in BUILDS_MODEL:  # the source's shape replaces the config's
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
        """Not at parse time (LightningCLI's): `build` seeds, so parsing changes nothing."""

    def _parse_ckpt_path(self) -> None:
        """Not LightningCLI's: a checkpoint's saved hyperparameters never override the config."""

    # ----------------------------------------------------------------- building the run

    def instantiate_classes(self) -> None:
        """Built by the commands that need them (`build`); `PlaygroundCLI(args, run=False)`,
        the Python API, builds them at once."""
        if self.instantiate and self.subcommand is None and not self.request.print_config:
            self.build(None)

    def resume_from(self, ckpt_path: str | None, default: str | None = None) -> Path | None:
        """The checkpoint `--ckpt_path` names (`default` without one: `validate`'s best). For
        `fit`, read under the folder's lock when the folder exists (a fit could rotate it)."""
        folder = self.experiment.checkpointing.dirpath
        if default is not None:
            return training.find_checkpoint(folder, ckpt_path or default)
        launching = training.is_launching_process()
        if launching and folder.is_dir() and not self.experiment.dry_run:
            self.lock.acquire()
        return training.resolve_resume(self.experiment, ckpt_path)

    def build(self, resume: Path | None) -> tuple[Trainer, GPTLightningModule, GPTDataModule]:
        """The data module, the module, the checkpoint callback and the Trainer; the process's
        seed and settings are set here, not while parsing."""
        training.prepare_runtime()
        super()._set_seed()
        with missing_packages_named():
            super().instantiate_classes()
        self.model.extras = CheckpointExtras(self.resolved_toml(), self.datamodule.meta)
        if resume is not None:
            training.check_resume(resume, self.model, self.datamodule)
        return self.trainer, self.model, self.datamodule

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = self._get(self.config_init, "trainer")
        bar = trainer.get("enable_progress_bar")
        kwargs["enable_progress_bar"] = bar = sys.stderr.isatty() if bar is None else bar
        user = trainer.get("callbacks") or []
        ours = training.project_callbacks(self.experiment, self.datamodule, bar)
        kwargs["callbacks"] = [*(user if isinstance(user, list) else [user]), *ours]
        kwargs["plugins"] = training.project_plugins()
        if trainer.get("logger") in (None, True):
            kwargs["logger"] = training.default_logger(self.experiment)
        with training.refused_trainer_values():
            return super().instantiate_trainer(**kwargs)

    # ----------------------------------------------------------------- the commands

    def _run_subcommand(self, subcommand: str) -> None:
        if self.request.print_config:
            print(self.resolved_toml(), end="")
            return
        args = self.config[subcommand]
        options = {key: args[key] for key in self._subcommand_method_arguments[subcommand]}
        commands.COMMANDS[subcommand].run(self, **options)


@contextmanager
def missing_packages_named() -> Iterator[None]:
    """A callback or logger whose package is not installed (WandbLogger without wandb): one
    line naming the class and what to install, not jsonargparse's chain of tracebacks."""
    try:
        yield
    except ValueError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ImportError):
            cause = cause.__cause__ or cause.__context__
        named = re.search(r"class_path '([\w.]+)'", str(exc))
        if cause is None or named is None:
            raise
        raise ConfigError(
            f"{named[1]} cannot be used: {str(cause).splitlines()[0]}; install it, or remove "
            "it from trainer.logger / trainer.callbacks"
        ) from None


def parse_only(argv: Sequence[str], env_vars: Sequence[str] = ()) -> ExperimentConfig:
    """The validated experiment of an argument list (no command); nothing is built."""
    return PlaygroundCLI(argv, run=False, env_vars=env_vars, instantiate=False).experiment


def check_command_first(argv: Sequence[str]) -> None:
    """`ml-playground --config F fit`: LightningCLI would read the file as a configuration of
    the commands themselves and blame its sections as unknown keys."""
    if not argv or argv[0] in commands.COMMANDS or argv[0] in ("-h", "--help"):
        return
    command = next((arg for arg in argv if arg in commands.COMMANDS), None)
    if command is not None and argv[0].startswith("-"):
        raise ConfigError(
            f"{argv[0]} comes before the command; put the command first: "
            f"`ml-playground {command} {argv[0]} ...`"
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(commands.DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if argv[:1] in (["-V"], ["--version"]):
        print(commands.version())
        return 0
    try:
        check_command_first(argv)
        PlaygroundCLI(argv)
    except (Exception, KeyboardInterrupt, SystemExit) as exc:
        code = None if debug and not isinstance(exc, SystemExit) else report(exc)
        if code is None:
            raise
        return code
    training.end_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
