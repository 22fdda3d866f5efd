"""The commands, declared once: each is a function whose signature (after `app`) and docstring
are its options and help; `COMMANDS` maps each name to it and to the override variables it
reads. `cli.PlaygroundCLI` builds a LightningCLI subcommand from each and calls it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ml_playground import console
from ml_playground.configuration.loading import SAMPLE_OVERRIDES_ENV, TRAIN_OVERRIDES_ENV
from ml_playground.configuration.schema import ExperimentConfig
from ml_playground.console import SEPARATOR
from ml_playground.errors import ConfigError
from ml_playground.files import write_atomic

if TYPE_CHECKING:
    import lightning.pytorch as pl

    from ml_playground.data import GPTDataModule
    from ml_playground.locking import FolderLock
    from ml_playground.module import GPTLightningModule

DEBUG_ENV = "ML_PLAYGROUND_DEBUG"


class App(Protocol):
    """What a command gets from the command line (`cli.PlaygroundCLI`): the validated
    experiment and, on demand, the Lightning classes built from it."""

    experiment: ExperimentConfig
    sample_experiment: ExperimentConfig  # with the sample overrides too (loop)
    lock: FolderLock
    result: console.RunResult | None

    def resume_from(self, ckpt_path: str | None, default: str | None = None) -> Path | None: ...

    def build(
        self, resume: Path | None
    ) -> tuple[pl.Trainer, GPTLightningModule, GPTDataModule]: ...


def prepare(app: App, force: bool = False) -> None:
    """Download or read the corpus and write train.bin, val.bin and meta.pkl.

    Args:
        force: prepare again even if the artifacts exist
    """
    prepare_dataset(app.experiment, force)


def fit(app: App, ckpt_path: str | None = None) -> None:
    """Train a GPT; resume with --ckpt_path.

    Args:
        ckpt_path: checkpoint to resume from: last, best or a checkpoint file
    """
    from ml_playground import training

    resume = app.resume_from(ckpt_path)
    trainer, module, data = app.build(resume)
    app.result = training.fit(trainer, module, data, app.experiment, resume, app.lock)
    console.report_fit(app.result, app.experiment)


def validate(app: App, ckpt_path: str | None = None) -> None:
    """Evaluate a checkpoint on the fixed validation windows.

    Args:
        ckpt_path: the checkpoint to evaluate: best (the default), last or a checkpoint file
    """
    from ml_playground import training

    path = app.resume_from(ckpt_path, default="best")
    assert path is not None
    trainer, module, data = app.build(path)
    app.result = training.validate(trainer, module, data, app.experiment, path)
    console.report_validate(app.result)


def sample(app: App) -> None:
    """Generate text from the checkpoint named by sample.ckpt."""
    sample_text(app.sample_experiment)


def loop(app: App, ckpt_path: str | None = None, force: bool = False) -> None:
    """Prepare (skipped when done), fit, then sample.

    Args:
        ckpt_path: checkpoint to resume from: last, best or a file
        force: prepare again even if the artifacts exist
    """
    prepare(app, force)
    fit(app, ckpt_path)
    if app.result is not None and app.result.is_global_zero:
        sample(app)  # sampling is rank 0's job


def export(app: App, ckpt_path: str = "best", output: str = "", force: bool = False) -> None:
    """Write a checkpoint as a Hugging Face GPT-2 folder (config.json, model.safetensors and
    the tokenizer files), for transformers and the tools that read that layout.

    Args:
        ckpt_path: the checkpoint to export: best (the default), last or a checkpoint file
        output: the folder to write (created; it must be empty, or hold an earlier export
            with --force)
        force: replace a folder an earlier export wrote (one that holds anything else is
            refused)
    """
    export_folder(app.experiment, ckpt_path, output, force)


def evaluate(app: App, ckpt_path: str = "best") -> None:
    """Score a model on HellaSwag in completion style, as build-nanogpt does: acc, acc_norm.

    Args:
        ckpt_path: the model to score: best (the default), last, a checkpoint file, a Hugging
            Face folder or a hub id (gpt2 scores OpenAI's GPT-2)
    """
    from ml_playground.evaluation import evaluate as score
    from ml_playground.sections import CheckpointRef

    cfg = app.experiment
    try:
        which = CheckpointRef.parse(ckpt_path)  # as sample.ckpt reads it
    except ValueError as exc:
        raise ConfigError(f"evaluate: --ckpt_path: {exc}") from None
    score(cfg.evaluate, which, cfg.checkpointing.dirpath, cfg.data.dataset_dir, cfg.trainer)


@dataclass(frozen=True)
class Command:
    run: Callable[..., None]
    overrides: tuple[str, ...] = ()  # the override variables it reads
    builds_model: bool = False  # reads model.init_from (its shape replaces the config's)


TRAIN, SAMPLE = (TRAIN_OVERRIDES_ENV,), (SAMPLE_OVERRIDES_ENV,)
COMMANDS: dict[str, Command] = {
    "prepare": Command(prepare),
    "fit": Command(fit, TRAIN, builds_model=True),
    "train": Command(fit, TRAIN, builds_model=True),  # the same as fit
    "validate": Command(validate, TRAIN, builds_model=True),
    "sample": Command(sample, SAMPLE),
    "loop": Command(loop, TRAIN, builds_model=True),  # its sampling adds the sample overrides
    "export": Command(export),
    "evaluate": Command(evaluate),
}
EPILOG = (
    f"Settings come from, lowest first: the packaged defaults, each --config file, the JSON "
    f"objects in {TRAIN_OVERRIDES_ENV} (fit, train, validate, loop) and {SAMPLE_OVERRIDES_ENV} "
    f"(sample, loop), then the flags. --print_config shows the result as TOML; --debug (or "
    f"{DEBUG_ENV}=1) shows tracebacks."
)
HELP: dict[str, Any] = {  # LightningCLI's parser_kwargs: the main parser's, then each command's
    "prog": "ml-playground",
    "description": "nanoGPT's prepare -> fit -> sample as a Lightning app, configured by TOML. "
    "`ml-playground COMMAND --help` lists every setting.",
    "epilog": EPILOG,
    **{name: {"epilog": EPILOG} for name in COMMANDS},
}


# ----------------------------------------------------------------- what the commands do


def prepare_dataset(cfg: ExperimentConfig, force: bool) -> None:
    from ml_playground.prepare import run_prepare

    did_work, meta = run_prepare(
        cfg.prepare,
        cfg.data.dataset_dir,
        seed=cfg.seed_everything,
        force=force,
        progress=sys.stderr.isatty(),
    )
    where = cfg.data.dataset_dir
    if did_work:
        print(
            f"prepare: wrote {where} (train {meta['train_tokens']:,} tokens, "
            f"val {meta['val_tokens']:,} tokens, vocabulary {meta['vocab_size']:,})"
        )
    else:
        print(f"prepare: {where} is already prepared; skipped (--force prepares again)")


def sample_text(cfg: ExperimentConfig) -> None:
    from ml_playground.sampling import sample as generate

    output = Path(cfg.sample.output) if cfg.sample.output else None
    if output is not None and (output.is_dir() or any(p.is_file() for p in output.parents)):
        what = "a folder" if output.is_dir() else "below a file"
        raise ConfigError(f"sample.output = {output} is {what}; give the path of a file to write")
    keep = cfg.checkpointing.keep
    path, texts = generate(
        cfg.sample,
        cfg.checkpointing.dirpath,
        cfg.data.dataset_dir,
        keeps_none=keep.last == keep.best == 0,
    )
    print(f"sampling from {path}", file=sys.stderr)
    report = "".join(f"{text}\n{SEPARATOR}\n" for text in texts)
    print(report, end="")
    if cfg.sample.output:
        output = Path(cfg.sample.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(output, report)
        print(f"samples written to {output}", file=sys.stderr)


def export_folder(cfg: ExperimentConfig, ckpt_path: str, output: str, force: bool) -> None:
    from ml_playground.export import export as write

    if not output:
        raise ConfigError("export: --output is required: the folder to write")
    target = Path(output).expanduser().absolute()
    path = write(ckpt_path, cfg.checkpointing.dirpath, cfg.data.dataset_dir, target, force)
    print(f"exported {path} to {target} (Hugging Face GPT-2: config.json, model.safetensors)")


def version() -> str:
    """`ml-playground --version`: ours, torch's and Lightning's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as of

    def installed(name: str) -> str:
        try:
            return of(name)
        except PackageNotFoundError:
            return "not installed"

    names = ("ml-playground", "torch", "lightning")
    mine, torch, lightning = (installed(name) for name in names)
    return f"ml-playground {mine} (torch {torch}, lightning {lightning})"
