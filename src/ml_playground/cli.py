"""The `ml-playground` console script: a table of commands, each a thin function.

Options follow LightningCLI's conventions: `--config F` (repeatable), dotted overrides such as
`--trainer.max_steps 100`, `--print_config`, `--ckpt_path last|best|FILE`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ml_playground.configuration.loading import (
    SAMPLE_OVERRIDES_ENV,
    TRAIN_OVERRIDES_ENV,
    dump_toml,
    load_config,
)
from ml_playground.configuration.schema import ExperimentConfig
from ml_playground.errors import ConfigError, MLPlaygroundError

DEBUG_ENV = "ML_PLAYGROUND_DEBUG"
SEPARATOR = "-" * 40

COMMANDS: dict[str, str] = {
    "prepare": "download or read the corpus and write train.bin, val.bin, meta.pkl",
    "fit": "train a GPT (resume with --ckpt_path last|best|FILE)",
    "train": "the same as fit",
    "validate": "evaluate a checkpoint on the validation split",
    "sample": "generate text from a checkpoint",
    "loop": "prepare (skipped when done), fit, then sample",
}


# --------------------------------------------------------------------------- parsing


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"ml-playground {command}",
        description=COMMANDS[command],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_settings_help(),
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="experiment TOML file; repeatable, later files override earlier ones",
    )
    parser.add_argument(
        "--print_config", action="store_true", help="print the resolved configuration as TOML"
    )
    parser.add_argument(
        "--debug", action="store_true", help=f"show tracebacks (also {DEBUG_ENV}=1)"
    )
    if command in ("fit", "train", "validate", "loop"):
        parser.add_argument(
            "--ckpt_path",
            metavar="last|best|FILE",
            help="checkpoint to resume from (validate: to evaluate; default best)",
        )
    if command in ("prepare", "loop"):
        parser.add_argument(
            "--force", action="store_true", help="prepare again even if the artifacts exist"
        )
    return parser


def _settings_help() -> str:
    lines = ["settings (TOML keys, or flags such as --model.n_layer 2):"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
            else:
                lines.append(f"  --{prefix}{name:<24} {info.description or ''}")

    walk(ExperimentConfig, "")
    lines.append("  --trainer.<arg>            any lightning.Trainer argument")
    lines.append(
        f"environment: {TRAIN_OVERRIDES_ENV} / {SAMPLE_OVERRIDES_ENV} hold JSON objects "
        "shaped like the TOML"
    )
    return "\n".join(lines)


def _split_overrides(extra: Sequence[str], command: str) -> list[tuple[str, str]]:
    """`--a.b value` / `--a.b=value` pairs from what argparse did not recognise."""
    flags: list[tuple[str, str]] = []
    items = list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("--") or len(item) == 2:
            raise ConfigError(f"{command}: unexpected argument {item!r}; see --help")
        key, eq, value = item[2:].partition("=")
        if not eq:
            if not items or (items[0].startswith("--") and len(items[0]) > 2):
                raise ConfigError(f"--{key}: missing value")
            value = items.pop(0)
        flags.append((key, value))
    return flags


def _load(args: argparse.Namespace, flags: list[tuple[str, str]], env: Sequence[str]) -> Any:
    return load_config(args.config, flags, env)


# --------------------------------------------------------------------------- commands


def cmd_prepare(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    from ml_playground.prepare import run_prepare

    prep = cfg.prepare
    did_work, meta = run_prepare(
        source=prep.source,
        source_sha256=prep.source_sha256 or None,
        tokenizer=prep.tokenizer,
        val_fraction=prep.val_fraction,
        dataset_dir=cfg.data.dataset_dir,
        force=getattr(args, "force", False),
        split=prep.split,
        seed=cfg.seed_everything,
        document_separator=prep.document_separator,
        chunk_bytes=prep.chunk_bytes,
        num_threads=prep.num_threads,
        progress=True,
    )
    where = cfg.data.dataset_dir
    if did_work:
        print(
            f"prepare: wrote {where} (train {meta['train_tokens']:,} tokens, "
            f"val {meta['val_tokens']:,} tokens, vocabulary {meta['vocab_size']:,})"
        )
    else:
        print(f"prepare: {where} is already prepared; skipped (--force prepares again)")
    return 0


def cmd_fit(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    from ml_playground.training import fit

    result = fit(cfg, args.ckpt_path)
    if not result.is_global_zero:
        return 0
    print(SEPARATOR)
    if result.stopped_early:
        print(
            f"stopped early: {result.metric} did not improve for "
            f"{cfg.checkpointing.patience} validation(s)"
        )
    if result.best_score is not None:
        where = result.best_checkpoint or "(not kept: checkpointing.keep.best = 0)"
        print(f"best {result.metric}: {result.best_score:.4f}  {where}")
    if result.last_checkpoint:
        print(f"last checkpoint: {result.last_checkpoint}")
    if result.log_dir:
        print(f"logs: {result.log_dir}")
        print(f"tensorboard --logdir {result.log_dir.parent}")
    return 0


def cmd_validate(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    from ml_playground.training import validate

    result = validate(cfg, args.ckpt_path or "best")
    if result.is_global_zero:
        for name, value in sorted(result.metrics.items()):
            print(f"{name}: {value:.4f}")
    return 0


def cmd_sample(cfg: ExperimentConfig, args: argparse.Namespace) -> int:
    from ml_playground.sampling import sample

    path, texts = sample(cfg)
    print(f"sampling from {path}", file=sys.stderr)
    report = "".join(f"{text}\n{SEPARATOR}\n" for text in texts)
    print(report, end="")
    if cfg.sample.output:
        output = Path(cfg.sample.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_name(f".{output.name}.tmp")
        tmp.write_text(report, encoding="utf-8")
        tmp.replace(output)
        print(f"samples written to {output}", file=sys.stderr)
    return 0


def cmd_loop(args: argparse.Namespace, flags: list[tuple[str, str]]) -> int:
    # Both configurations are validated before any work starts.
    train_cfg = _load(args, flags, [TRAIN_OVERRIDES_ENV])
    sample_cfg = _load(args, flags, [TRAIN_OVERRIDES_ENV, SAMPLE_OVERRIDES_ENV])
    if args.print_config:
        print(dump_toml(train_cfg), end="")
        return 0
    cmd_prepare(train_cfg, args)
    cmd_fit(train_cfg, args)
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return 0  # sampling is rank 0's job
    return cmd_sample(sample_cfg, args)


HANDLERS: dict[str, tuple[Callable[[ExperimentConfig, argparse.Namespace], int], list[str]]] = {
    "prepare": (cmd_prepare, []),
    "fit": (cmd_fit, [TRAIN_OVERRIDES_ENV]),
    "train": (cmd_fit, [TRAIN_OVERRIDES_ENV]),
    "validate": (cmd_validate, [TRAIN_OVERRIDES_ENV]),
    "sample": (cmd_sample, [SAMPLE_OVERRIDES_ENV]),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    return (
        "usage: ml-playground COMMAND --config FILE [--section.key VALUE ...]\n\n"
        f"commands:\n{rows}\n\n"
        "Run `ml-playground COMMAND --help` for the options and settings; "
        "`ml-playground --version` for the versions."
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"ml-playground {of('ml-playground')} (torch {of('torch')}, lightning {of('lightning')})"


def run(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(_version())
        return 0
    command, rest = argv[0], list(argv[1:])
    if command not in COMMANDS:
        raise ConfigError(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}")
    parser = _parser(command)
    args, extra = parser.parse_known_args(rest)
    flags = _split_overrides(extra, command)
    if command == "loop":
        return cmd_loop(args, flags)
    handler, env = HANDLERS[command]
    cfg = _load(args, flags, env)
    if args.print_config:
        print(dump_toml(cfg), end="")
        return 0
    return handler(cfg, args)


def describe_os_error(exc: OSError) -> str:
    """`<strerror>: <filename>` (both files for a failed rename or link)."""
    text = exc.strerror or str(exc) or type(exc).__name__
    names = [str(name) for name in (exc.filename, exc.filename2) if name is not None]
    return f"{text}: {' -> '.join(names)}" if names else text


# What gloo raises when a peer process of a distributed run is gone (NCCL raises DistError).
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer")


def lost_peer(exc: BaseException) -> str | None:
    """If a distributed run's collective failed because another of its processes stopped:
    this process's rank (or "?")."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return None
    if dist.is_initialized():
        rank = str(dist.get_rank())
    elif os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        rank = os.environ.get("RANK", "?")
    else:
        return None  # not a distributed run
    if isinstance(exc, dist.DistError) or any(sign in str(exc) for sign in LOST_PEER_SIGNS):
        return rank
    return None


def _first_sentence(exc: BaseException) -> str:
    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip())  # gloo's "[source.cc:561] " prefix
    return (text.split(". ")[0].splitlines() or [type(exc).__name__])[0][:200]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return run(argv)
    except MLPlaygroundError as exc:
        if debug:
            raise
        print(f"ml-playground: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # Not foreseen where it happened (permission denied, read-only or full disk, ...):
        # still one line naming the path, unless --debug asks for the traceback.
        if debug:
            raise
        print(f"ml-playground: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ml-playground: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        rank = None if debug else lost_peer(exc)
        if rank is None:
            raise
        # A consequence, not the cause: the process that failed first reports why.
        print(
            f"ml-playground: error: rank {rank} lost contact with another process of this "
            f"distributed run ({_first_sentence(exc)}); that process's own error says why",
            file=sys.stderr,
        )
        return 1
    except SystemExit as exc:
        if type(exc).__name__ != "SIGTERMException":  # Lightning's, raised after saving
            raise
        print("ml-playground: stopped by SIGTERM; resume with --ckpt_path last", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
