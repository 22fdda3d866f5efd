"""What each command does once the configuration is parsed and validated, and what it prints."""

from __future__ import annotations

import sys
from pathlib import Path

from ml_playground.configuration.loading import SAMPLE_OVERRIDES_ENV, TRAIN_OVERRIDES_ENV
from ml_playground.configuration.schema import ExperimentConfig
from ml_playground.errors import ConfigError
from ml_playground.files import write_atomic
from ml_playground.reporting import SEPARATOR

DEBUG_ENV = "ML_PLAYGROUND_DEBUG"
COMMANDS = (
    "prepare",
    "fit",
    "train",
    "validate",
    "sample",
    "loop",
    "export",
)  # their help: the Trainer's
ENV_OF = {  # the override variables each command reads
    "prepare": [],
    "fit": [TRAIN_OVERRIDES_ENV],
    "train": [TRAIN_OVERRIDES_ENV],
    "validate": [TRAIN_OVERRIDES_ENV],
    "sample": [SAMPLE_OVERRIDES_ENV],
    "loop": [TRAIN_OVERRIDES_ENV],
    "export": [],
}
EPILOG = (
    f"Settings come from, lowest first: the packaged defaults, each --config file, the JSON "
    f"objects in {TRAIN_OVERRIDES_ENV} (fit, train, validate, loop) and {SAMPLE_OVERRIDES_ENV} "
    f"(sample, loop), then the flags. --print_config shows the result as TOML; --debug (or "
    f"{DEBUG_ENV}=1) shows tracebacks."
)
HELP = {  # LightningCLI's parser_kwargs: the main parser's, then each command's
    "prog": "ml-playground",
    "description": "nanoGPT's prepare -> fit -> sample as a Lightning app, configured by TOML. "
    "`ml-playground COMMAND --help` lists every setting.",
    "epilog": EPILOG,
    **{name: {"epilog": EPILOG} for name in COMMANDS},
}


def prepare(cfg: ExperimentConfig, force: bool) -> None:
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


def sample(cfg: ExperimentConfig) -> None:
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


def export(cfg: ExperimentConfig, ckpt_path: str, output: str, force: bool) -> None:
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
