"""The ``prepare`` step: fetch the corpus, tokenize it and write the dataset artifacts.

``prepare.source`` is a URL (downloaded once into the cache), one UTF-8 file, a folder (every
``*.txt`` below it, in sorted order) or a glob pattern. It does nothing when valid artifacts for
the same tokenizer already exist (unless forced).
"""

from __future__ import annotations

from pathlib import Path

from ml_playground.errors import ConfigError, DataError
from ml_playground.prepare.artifacts import (
    artifacts_ready,
    dataset_meta,
    is_nanogpt_gpt2_folder,
)
from ml_playground.prepare.config import PrepareConfig
from ml_playground.prepare.sources import resolve_source
from ml_playground.prepare.stream import prepare_corpus
from ml_playground.prepare.tokenizers import check_spec, spec_of


def _check_same_settings(meta: dict, settings: PrepareConfig, where: Path) -> None:
    hint = "pass --force to rebuild them or choose another data.dataset_dir"
    if "tokenizer" in meta and (got := spec_of(meta)) != settings.tokenizer:
        raise DataError(
            f"{where} holds artifacts for tokenizer {got!r} but prepare.tokenizer is "
            f"{settings.tokenizer!r}; {hint}"
        )
    for key, wanted in (
        ("split", settings.split),
        ("source", str(settings.source)),
        ("val_fraction", settings.val_fraction),
    ):
        if meta.get(key, wanted) != wanted:  # folders of older versions lack source/fraction
            raise DataError(
                f"{where} holds artifacts prepared with {key} = {meta[key]!r} but "
                f"prepare.{key} is {wanted!r}; {hint}"
            )


def run_prepare(
    settings: PrepareConfig,
    dataset_dir: Path,
    *,
    seed: int,
    force: bool = False,
    progress: bool = False,
) -> tuple[bool, dict]:
    """Prepare ``dataset_dir`` as ``settings`` say; return ``(did_work, meta)``.

    ``seed`` draws the validation documents of ``split = "documents"``.
    """
    dataset_dir = Path(dataset_dir)
    if not force and (artifacts_ready(dataset_dir) or is_nanogpt_gpt2_folder(dataset_dir)):
        meta = dataset_meta(dataset_dir)
        _check_same_settings(meta, settings, dataset_dir)
        return False, meta
    if problem := check_spec(settings.tokenizer):  # before any download or read
        raise ConfigError(f"prepare.tokenizer: {problem}")
    files = resolve_source(settings.source, settings.source_sha256 or None)
    meta = prepare_corpus(
        files, settings.tokenizer, dataset_dir, settings, seed=seed, progress=progress
    )
    return True, meta
