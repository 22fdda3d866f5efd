"""The `ml-playground` console script: a LightningCLI over the GPT module, its data module and
the checkpoint policy, configured by TOML, plus the commands `prepare`, `sample` and `loop`.

`[model]`, `[data]` and `[checkpointing]` are the init arguments of `GPTLightningModule`,
`GPTDataModule` and `GPTCheckpoint`; `[trainer]` those of Lightning's Trainer (callbacks and
loggers included); `[prepare]` and `[sample]` are groups of their own. jsonargparse parses and
type-checks; `configuration/loading.py` orders the layers, checks strict types and words the
errors; the Pydantic schema validates the whole experiment for every command.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import Namespace, set_dumper
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ml_playground import commands, training
from ml_playground.checkpointing import CheckpointExtras, GPTCheckpoint
from ml_playground.configuration.loading import (
    NULL,
    SAMPLE_OVERRIDES_ENV,
    TRAIN_OVERRIDES_ENV,
    Request,
    arrange,
    check_strict,
    describe_parse_error,
    dump_toml,
    packaged_defaults,
    validate,
)
from ml_playground.configuration.schema import (
    MANAGED_TRAINER_KEYS,
    AnchoredPath,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    PrepareConfig,
    SampleConfig,
)
from ml_playground.data import GPTDataModule
from ml_playground.errors import ConfigError, MLPlaygroundError, describe_os_error, lost_peer
from ml_playground.model.module import GPTLightningModule
from ml_playground.training import SaveResolvedConfig

DEBUG_ENV = "ML_PLAYGROUND_DEBUG"
ENV_OF = {
    "prepare": [],
    "fit": [TRAIN_OVERRIDES_ENV],
    "train": [TRAIN_OVERRIDES_ENV],
    "validate": [TRAIN_OVERRIDES_ENV],
    "sample": [SAMPLE_OVERRIDES_ENV],
    "loop": [TRAIN_OVERRIDES_ENV],
}
SECTIONS = list(ExperimentConfig.model_fields)
COMMANDS = {
    "prepare": "Download or read the corpus and write train.bin, val.bin and meta.pkl.",
    "fit": "Train a GPT (resume with --ckpt_path last|best|FILE).",
    "train": "The same as fit.",
    "validate": "Evaluate a checkpoint (--ckpt_path, default best) on the validation windows.",
    "sample": "Generate text from the checkpoint named by sample.ckpt.",
    "loop": "Prepare (skipped when done), fit, then sample.",
}
EPILOG = (
    f"Settings come from, lowest first: the packaged defaults, each --config file, the JSON "
    f"objects in {TRAIN_OVERRIDES_ENV} (fit, train, validate, loop) and {SAMPLE_OVERRIDES_ENV} "
    f"(sample, loop), then the flags. --print_config shows the result as TOML; --debug (or "
    f"{DEBUG_ENV}=1) shows tracebacks."
)
set_dumper("toml", dump_toml)


class PlaygroundTrainer(Trainer):
    """Lightning's Trainer. LightningCLI takes each command's options and help from the Trainer
    method of that name; `prepare`, `sample` and `loop` are run by the CLI itself."""

    train = Trainer.fit

    def prepare_command(self, force: bool = False) -> None:
        """Download or read the corpus and write train.bin, val.bin and meta.pkl.

        Args:
            force: prepare again even if the artifacts exist
        """
        raise NotImplementedError("run `ml-playground prepare`")

    def sample_command(self) -> None:
        """Generate text from the checkpoint named by sample.ckpt."""
        raise NotImplementedError("run `ml-playground sample`")

    def loop_command(self, ckpt_path: str | None = None, force: bool = False) -> None:
        """Prepare (skipped when done), fit, then sample.

        Args:
            ckpt_path: checkpoint to resume from: last, best or a file
            force: prepare again even if the artifacts exist
        """
        raise NotImplementedError("run `ml-playground loop`")

    # jsonargparse names a method's group after its __name__: "prepare" and "sample" would
    # collide with the [prepare] and [sample] sections.
    prepare, sample, loop = prepare_command, sample_command, loop_command


class PlaygroundCLI(LightningCLI):
    """`ml-playground COMMAND --config FILE ... [--section.key VALUE ...]`."""

    def __init__(
        self,
        args: Sequence[str] | None = None,
        *,
        run: bool = True,
        env_vars: Sequence[str] | None = None,
        instantiate: bool = True,
    ) -> None:
        self.env_vars, self.instantiate = env_vars, instantiate
        self.result: training.RunResult | None = None
        self.lock = training.FolderLock(Path())  # the checkpoint folder's, once it is known
        training.prepare_runtime()
        try:
            self._start(args, run)
        finally:
            self.lock.release()

    def _start(self, args: Sequence[str] | None, run: bool) -> None:
        super().__init__(
            GPTLightningModule,
            GPTDataModule,
            save_config_callback=SaveResolvedConfig,
            save_config_kwargs={"save_to_log_dir": False},
            trainer_class=PlaygroundTrainer,
            parser_kwargs={
                "parser_mode": "toml",
                "exit_on_error": False,
                "prog": "ml-playground",
                "description": "nanoGPT's prepare -> fit -> sample as a Lightning app, "
                "configured by TOML. `ml-playground COMMAND --help` lists every setting.",
                "epilog": EPILOG,
                **{
                    name: {"description": text, "epilog": EPILOG} for name, text in COMMANDS.items()
                },
            },
            args=list(args) if args is not None else None,
            run=run,
            auto_configure_optimizers=False,
            load_from_checkpoint_support=False,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        fit = {"model", "train_dataloaders", "val_dataloaders", "datamodule", "weights_only"}
        validate = {"model", "dataloaders", "datamodule", "verbose", "weights_only"}
        return {
            "prepare": set(),
            "fit": fit,
            "train": fit,
            "validate": validate,
            "sample": set(),
            "loop": set(),
        }

    # ----------------------------------------------------------------- the parser

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(
            self.trainer_class,
            "trainer",
            fail_untyped=False,
            instantiate=False,
            sub_configs=True,
            skip=set(MANAGED_TRAINER_KEYS),
        )
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
        parser.link_arguments(
            ("data.batch_size", "data.block_size"),
            "model.tokens_per_batch",
            compute_fn=lambda batch, block: batch * block,
        )
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        # Not default_config_files: jsonargparse would anchor the defaults' relative paths at
        # the package folder instead of the working directory.
        parser.set_defaults(_flat(packaged_defaults()))

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        command = argv[0] if self.subcommands_on and argv and argv[0] in ENV_OF else None
        variables = ENV_OF.get(command or "", []) if self.env_vars is None else self.env_vars
        self.request = arrange(argv, command, variables)
        self.config = self._parse(parser, self.request)
        self.experiment = self._validate(self.request, self.config)
        self.sample_experiment = self.experiment
        self.lock = training.FolderLock(self.experiment.checkpointing.dirpath)
        if command == "loop":  # its sampling adds the sample overrides: check both now
            second = arrange(argv, command, [TRAIN_OVERRIDES_ENV, SAMPLE_OVERRIDES_ENV])
            self.sample_experiment = self._validate(second, self._parse(parser, second))

    @property
    def subcommands_on(self) -> bool:
        return hasattr(self, "_subcommand_parsers")

    def _parse(self, parser: LightningArgumentParser, request: Request) -> Namespace:
        try:
            config = parser.parse_args(request.argv)
        except ArgumentError as exc:
            message = describe_parse_error(request, str(exc))
            raise ConfigError(" ".join(message.split())) from None
        check_strict(request, self._section(config, request.command))
        return config

    @staticmethod
    def _section(config: Namespace, command: str | None) -> Namespace:
        return config[command] if command else config

    def _validate(self, request: Request, config: Namespace) -> ExperimentConfig:
        ns = self._section(config, request.command)
        data = ns.clone().as_dict()
        whole = {key: data.get(key) for key in SECTIONS}
        # Link targets (data.seed, model.tokens_per_batch) are not settings.
        whole["data"] = {k: v for k, v in data["data"].items() if k in DataConfig.model_fields}
        whole["model"] = {k: v for k, v in data["model"].items() if k in ModelConfig.model_fields}
        experiment = validate(request, whole)
        # The validated values (absolute paths, "{experiment}" replaced) are what the classes
        # get and what is printed and saved.
        for key, value in _flat(experiment.model_dump(exclude={"trainer"})).items():
            ns[key] = value
        return experiment

    def resolved_toml(self) -> str:
        """The experiment as TOML that `--config` reads back (printed, saved, checkpointed)."""
        parser = self._parser(self.subcommand)
        ns = self._section(self.config, self.subcommand)
        data = json.loads(parser.dump(ns, format="json", skip_none=False, skip_validation=True))
        return dump_toml({key: data[key] for key in SECTIONS if key in data})

    def _parse_ckpt_path(self) -> None:
        """LightningCLI would apply a `--ckpt_path FILE`'s saved hyperparameters over the config
        and the flags; here the configuration decides, and a checkpoint that does not fit it
        is an error (`training.check_resume`)."""

    # ----------------------------------------------------------------- building the run

    def before_instantiate_classes(self) -> None:
        self.resume: Path | None = None
        if self.request.print_config or self.subcommand not in ("fit", "train", "validate"):
            return
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if self.subcommand == "validate":
            dirpath = self.experiment.checkpointing.dirpath
            self.resume = training.find_checkpoint(dirpath, ckpt_path or "best")
        else:
            self.resume = self.resolve_resume(ckpt_path)

    def resolve_resume(self, ckpt_path: str | None) -> Path | None:
        """The checkpoint to resume from, read under the folder's lock when the folder exists
        (a running fit could rotate it away); otherwise the lock is taken when training starts."""
        dirpath = self.experiment.checkpointing.dirpath
        if training.is_launching_process() and dirpath.is_dir():
            self.lock.acquire()
        return training.resolve_resume(self.experiment, ckpt_path)

    def instantiate_classes(self) -> None:
        skip = self.subcommand in ("prepare", "sample", "loop") or self.request.print_config
        if self.instantiate and not skip:
            self.build()

    def build(self) -> None:
        """The data module, the module, the checkpoint callback and the Trainer."""
        super().instantiate_classes()
        self.checkpoint: GPTCheckpoint = self._get(self.config_init, "checkpointing")
        self.checkpoint.extras = CheckpointExtras(self.resolved_toml(), self.datamodule.meta)
        if self.resume is not None:
            training.check_resume(self.resume, self.model, self.datamodule)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = self._get(self.config_init, "trainer")
        user = trainer.get("callbacks") or []
        bar = trainer.get("enable_progress_bar")
        kwargs["enable_progress_bar"] = sys.stderr.isatty() if bar is None else bar  # not in logs
        kwargs["callbacks"] = [
            *(user if isinstance(user, list) else [user]),
            *training.project_callbacks(
                self.experiment, self.datamodule, kwargs["enable_progress_bar"]
            ),
        ]
        kwargs["plugins"] = training.project_plugins()
        if trainer.get("logger") in (None, True):
            kwargs["logger"] = training.default_logger(self.experiment)
        return super().instantiate_trainer(**kwargs)

    def run_parts(self) -> tuple[Trainer, GPTLightningModule, GPTDataModule, ExperimentConfig]:
        return self.trainer, self.model, self.datamodule, self.experiment

    # ----------------------------------------------------------------- the commands

    def _run_subcommand(self, subcommand: str) -> None:
        if self.request.print_config:
            print(self.resolved_toml(), end="")
            return
        args = self.config[subcommand]
        if subcommand == "prepare":
            commands.prepare(self.experiment, force=args.force)
        elif subcommand in ("fit", "train"):
            self.result = commands.fit(*self.run_parts(), self.resume, self.lock)
        elif subcommand == "validate":
            assert self.resume is not None
            self.result = commands.validate(*self.run_parts(), self.resume)
        elif subcommand == "sample":
            commands.sample(self.experiment)
        else:  # loop
            commands.prepare(self.experiment, force=args.force)
            self.resume = self.resolve_resume(args.ckpt_path)
            self.build()
            self.result = commands.fit(*self.run_parts(), self.resume, self.lock)
            if self.trainer.is_global_zero:  # sampling is rank 0's job
                commands.sample(self.sample_experiment)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables as dotted keys; TOML's "null" as None."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = None if value == NULL else value
    return out


def end_distributed() -> None:
    """Close a DDP process group while Python can still join its threads: left to interpreter
    shutdown, gloo's threads abort the process ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def parse_only(argv: Sequence[str], env_vars: Sequence[str] = ()) -> ExperimentConfig:
    """The validated experiment of an argument list (no command), nothing instantiated."""
    return PlaygroundCLI(argv, run=False, env_vars=env_vars, instantiate=False).experiment


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"ml-playground {of('ml-playground')} (torch {of('torch')}, lightning {of('lightning')})"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if argv[:1] in (["-V"], ["--version"]):
        print(_version())
        return 0
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter.*")
    try:
        PlaygroundCLI(argv)
        end_distributed()
        return 0
    except MLPlaygroundError as exc:
        if debug:
            raise
        print(f"ml-playground: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # Not foreseen where it happened (permission denied, full disk, ...): still one line.
        if debug:
            raise
        print(f"ml-playground: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ml-playground: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        line = None if debug else lost_peer(exc)
        if line is None:
            raise
        print(f"ml-playground: error: {line}", file=sys.stderr)
        return 1
    except SystemExit as exc:
        if type(exc).__name__ != "SIGTERMException":  # Lightning's, raised after saving
            raise
        print("ml-playground: stopped by SIGTERM; resume with --ckpt_path last", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
