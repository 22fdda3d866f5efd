"""Checkpoint files with torch alone: names, finding `last` / `best`, safe reading and
validation; the Lightning callback that writes them lives in `checkpoint_writing.py`."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ml_playground.errors import CheckpointError, shorten

FORMAT_VERSION = 1
SECTION = "ml_playground"  # the project's own part of a Lightning checkpoint
REQUIRED_KEYS = ("state_dict", "global_step", SECTION)
SECTION_KEYS = ("format_version", "model_args", "config_toml", "meta")
NANOGPT_KEYS = ("model", "model_args", "iter_num", "config")

LAST_PATTERN = re.compile(r"^ckpt_last_(\d{8})\.pt$")
BEST_PATTERN = re.compile(r"^ckpt_best_(\d{8})_.*\.pt$")
TMP_PATTERN = re.compile(r"^\.ckpt_(last|best)_.*\.tmp-\d+$")
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def managed_files(dirpath: Path, kind: str) -> list[Path]:
    """This kind's checkpoint files in the folder, oldest step first."""
    pattern = LAST_PATTERN if kind == "last" else BEST_PATTERN
    if not dirpath.is_dir():
        return []
    found = [p for p in dirpath.iterdir() if pattern.match(p.name)]
    return sorted(found, key=lambda p: (file_step(p), p.name))


def file_step(path: Path) -> int:
    """The optimizer step in a `ckpt_last_*` / `ckpt_best_*` file name."""
    return int(path.name.split("_")[2][:8])


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint file holds, read without loading its tensors."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(checkpoint["global_step"])


def find_checkpoint(dirpath: Path, which: str) -> Path:
    """Resolve `last` / `best` to the file with the highest step, or check a given file; a
    file named as ours must hold the step its name says."""
    if which in ("last", "best"):
        files = managed_files(dirpath, which)
        if not files:
            other = "best" if which == "last" else "last"
            if managed_files(dirpath, other):
                hint = f"use --ckpt_path {other} (or sample.ckpt = {other!r})"
                why = f"checkpointing.keep.{which} may be 0"
                raise CheckpointError(f"{dirpath}: no ckpt_{which}_* checkpoint ({why}); {hint}")
            raise CheckpointError(
                f"{dirpath}: no checkpoint found; train first with `ml-playground fit --config ...`"
            )
        path = files[-1]
    else:
        path = Path(which)
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint file not found")
    check_named_step(path)
    return path


def check_named_step(path: Path) -> None:
    """A `ckpt_last_*` / `ckpt_best_*` file holds the step its name says. A copied or renamed
    one would be resumed as the newest while it holds an older step, and the run would then
    overwrite and rotate away the newer files."""
    if not (LAST_PATTERN.match(path.name) or BEST_PATTERN.match(path.name)):
        return
    named = file_step(path)
    try:
        held = checkpoint_step(path)
    except Exception:  # unreadable: read_checkpoint says why when the file is loaded
        return
    if held != named:
        right = path.name.replace(f"_{named:08d}", f"_{held:08d}", 1)
        raise CheckpointError(
            f"{path}: its name says step {named} but it holds step {held} (copied or renamed?); "
            f"rename it to {right} or move it out of {path.parent}, then run again"
        )


def read_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """Unpickle a checkpoint file safely (weights_only=True); no validation beyond a dict.
    With `mmap` the tensors stay in the file until used (no second copy in memory)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    _refuse_expanding(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated zip, not a pickle, disallowed global, ...
        text = _ANSI_ESCAPE.sub("", str(exc)).strip()
        found = _UNSAFE_GLOBAL.search(text)
        if found:
            raise CheckpointError(
                f"{path}: refusing to load: it references {found.group(1)}, which no checkpoint "
                "needs (read with weights_only=True, so nothing in it ran); use a checkpoint "
                "from a source you trust"
            ) from None
        # torch's first sentence says what failed; later ones advise weights_only=False.
        reason = re.split(r"(?<=\w)\. ", text.splitlines()[0])[0] if text else type(exc).__name__
        raise CheckpointError(
            f"{path}: not a readable checkpoint (truncated or not a checkpoint: "
            f"{shorten(reason, 120)}); use another ckpt_last_* / ckpt_best_* file"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not an ml-playground checkpoint (not a dict)")
    return checkpoint


def _refuse_expanding(path: Path) -> None:
    """torch.save stores its zip entries uncompressed: entries that claim to expand past the
    file's own size are a compressed archive built to exhaust memory (a zip bomb)."""
    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # not a zip: torch.load says what it is
    size = path.stat().st_size
    if expanded > size:
        raise CheckpointError(
            f"{path}: refusing to load: its contents claim {expanded:,} bytes in a {size:,}-byte "
            "file (compressed; checkpoints never are); use a checkpoint from a source you trust"
        )


def is_nanogpt_checkpoint(checkpoint: dict[str, Any]) -> bool:
    """A `ckpt.pt` written by nanoGPT's train.py."""
    return all(key in checkpoint for key in NANOGPT_KEYS) and SECTION not in checkpoint


def load_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint safely and check it is one of ours, of a known version."""
    return checked_checkpoint(path, read_checkpoint(path, mmap=mmap))


def checked_checkpoint(path: Path, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """`checkpoint`, read from `path`, if it is one of ours of a known version."""
    if is_nanogpt_checkpoint(checkpoint):
        raise CheckpointError(
            f"{path}: a nanoGPT checkpoint; `sample --sample.ckpt {path}` can sample from it, "
            "but fit cannot resume it"
        )
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{path}: not an ml-playground checkpoint (missing {', '.join(missing)})"
        )
    section = checkpoint[SECTION]
    version = section.get("format_version") if isinstance(section, dict) else None
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: checkpoint has no format version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this ml-playground supports "
            f"({FORMAT_VERSION}); upgrade ml-playground"
        )
    missing = [key for key in SECTION_KEYS if key not in section]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    for key in ("model_args", "meta"):
        if not isinstance(section[key], dict):
            raise CheckpointError(f"{path}: the checkpoint's {key} is not a table; it is damaged")
    return checkpoint


def check_same_tokenizer(
    path: Path, meta: dict[str, Any], dataset_meta: dict[str, Any], fix: str
) -> None:
    """A checkpoint's tokenizer (its meta) is the dataset's, by content, not by size."""
    for key in ("tokenizer", "encoding", "itos", "tokenizer_json"):
        if meta.get(key) != dataset_meta.get(key):
            raise CheckpointError(
                f"{path}: the checkpoint's tokenizer is not this dataset's (meta.pkl differs in "
                f"{key!r}); {fix}"
            )


def check_compatible(
    path: Path,
    checkpoint: dict[str, Any],
    model_args: dict[str, Any],
    dataset_vocab: int | None = None,
    dataset_meta: dict[str, Any] | None = None,
) -> None:
    """Refuse to resume a checkpoint whose model shape or vocabulary differs from the run's.

    `model_args["vocab_size"]` is padded to model.vocab_multiple_of; `dataset_vocab`, the
    dataset's own size, tells a changed padding from a changed dataset."""
    stored = checkpoint[SECTION]["model_args"]
    meta = checkpoint[SECTION].get("meta")
    stored_vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if stored.get("vocab_size") != model_args.get("vocab_size"):
        if dataset_vocab is not None and stored_vocab == dataset_vocab:
            raise CheckpointError(
                f"{path}: the model's vocabulary is padded to {stored.get('vocab_size')} in the "
                f"checkpoint but to {model_args.get('vocab_size')} with this config's "
                "model.vocab_multiple_of; use the value the checkpoint was trained with"
            )
        raise CheckpointError(
            f"{path}: vocabulary of {stored.get('vocab_size')} tokens, but this run's dataset "
            f"(meta.pkl) gives {model_args.get('vocab_size')}; resume with the dataset it was "
            "trained on"
        )
    if isinstance(meta, dict) and dataset_meta:
        check_same_tokenizer(path, meta, dataset_meta, "resume with the dataset it was trained on")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "bias"):
        if stored.get(key) != model_args.get(key):
            raise CheckpointError(
                f"{path}: model.{key} is {stored.get(key)!r} in the checkpoint but "
                f"{model_args.get(key)!r} in the config; use the checkpoint's model settings"
            )
