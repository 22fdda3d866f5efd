"""The `ml-playground` console script: the experiment parser (`configuration/parser.py`, a
LightningCLI in TOML mode) with a subcommand per entry of `commands.COMMANDS`, the Lightning
classes built for the commands that need them, and one line per error (`main`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ml_playground import commands, console, locking, training
from ml_playground.configuration.loading import SAMPLE_OVERRIDES_ENV, arrange
from ml_playground.configuration.parser import ExperimentParser
from ml_playground.data import GPTDataModule
from ml_playground.errors import ConfigError, report
from ml_playground.module import CheckpointExtras, GPTLightningModule
from ml_playground.pretrained import check_source_tokenizer


class PlaygroundCLI(ExperimentParser):
    """`ml-playground COMMAND --config FILE ...`; from Python `PlaygroundCLI(["fit", ...])`."""

    def __init__(
        self,
        args: Sequence[str] | None = None,
        *,
        run: bool = True,
        env_vars: Sequence[str] | None = None,
        instantiate: bool = True,
    ) -> None:
        self.instantiate = instantiate
        argv = list(sys.argv[1:] if args is None else args)
        # The command the arguments name, if any: only its parser is built (each one holds the
        # Trainer's and every section's arguments; building all of them cost `sample` 0.2 s).
        self.named = argv[0] if argv[:1] and argv[0] in commands.COMMANDS else None
        self.result: console.RunResult | None = None
        self.lock = locking.FolderLock(Path())  # the checkpoint folder's, once it is known
        try:
            super().__init__(
                args,
                run=run,
                env_vars=env_vars,
                save_config_callback=training.SaveResolvedConfig,
                save_config_kwargs={"save_to_log_dir": False},
                parser_kwargs=commands.HELP,
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
            if self.named not in (None, name):
                continue
            description = (command.run.__doc__ or "").strip().splitlines()[0]
            sub = self.init_parser(**{"description": description, **kwargs.get(name, {})})
            self._add_arguments(sub)
            options = sub.add_function_arguments(command.run, as_group=False, skip={"app"})
            self._subcommand_method_arguments[name] = options
            self._subcommand_parsers[name] = sub
            subcommands.add_subcommand(name, sub, help=description)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        self.sample_experiment = self.experiment
        self.lock = locking.FolderLock(self.experiment.checkpointing.dirpath)
        if self.request.command == "loop":  # its sampling adds the sample overrides: check now
            variables = [*self.overrides("loop"), SAMPLE_OVERRIDES_ENV]
            second = arrange(self.argv, "loop", variables)
            self.sample_experiment = self._validate(second, self._parse(parser, second))

    def overrides(self, command: str) -> Sequence[str]:
        return commands.COMMANDS[command].overrides

    def reads_init_from(self, command: str) -> bool:
        return commands.COMMANDS[command].builds_model

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
        LightningCLI._set_seed(self)
        with missing_packages_named():
            LightningCLI.instantiate_classes(self)
        self.model.extras = CheckpointExtras(self.resolved_toml(), self.datamodule.meta)
        if resume is not None:
            training.check_resume(resume, self.model, self.datamodule)
        elif self.experiment.model.init_from != "scratch":
            check_source_tokenizer(self.experiment.model.init_from, self.datamodule.meta)
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
