"""The ``prepare`` step: fetch the corpus, tokenize it and write the dataset artifacts.

``prepare.source`` is a URL (downloaded once into the cache), one UTF-8 file, a folder (every
``*.txt`` below it, in sorted order) or a glob pattern. It does nothing when valid artifacts for
the same tokenizer already exist (unless forced).
"""

from __future__ import annotations

import glob
from pathlib import Path

from pydantic import Field, field_validator

from ml_playground.errors import ConfigError, DataError
from ml_playground.prepare.artifacts import (
    artifacts_ready,
    dataset_meta,
    is_nanogpt_gpt2_folder,
)
from ml_playground.prepare.download import fetch, is_url
from ml_playground.prepare.stream import Split, prepare_corpus
from ml_playground.prepare.tokenizers import TiktokenTokenizer, unknown_encoding
from ml_playground.settings import Section, Source


class PrepareConfig(Section):
    """How `prepare` turns a raw corpus into train.bin / val.bin / meta.pkl."""

    source: Source = Field(
        description="the raw corpus: a URL (downloaded once into the cache), a UTF-8 file, a "
        "folder (every *.txt below it, sorted) or a glob pattern; relative paths resolve "
        "against the config file"
    )
    source_sha256: str = Field(
        description='expected sha256 of the raw corpus (hex, any case); "" skips the check',
        pattern=r"^([0-9a-fA-F]{64})?$",
    )
    tokenizer: str = Field(
        description='"char" (one token per character) or "tiktoken:<encoding>", e.g. tiktoken:gpt2',
        pattern=r"^(char|tiktoken:[A-Za-z0-9_.-]+)$",
    )
    val_fraction: float = Field(
        description="share of the corpus held out for validation: the last part of the text "
        '(split "contiguous") or of the documents (split "documents")',
        gt=0.0,
        lt=1.0,
    )
    split: Split = Field(
        description="\"contiguous\": nanoGPT's split, the text's last val_fraction validates; "
        '"documents": a random val_fraction of the documents (seeded by seed_everything)'
    )
    document_separator: str = Field(
        description='what separates documents inside a file ("" : each file is one document); '
        "with BPE, documents are joined by the end-of-text token"
    )
    chunk_bytes: int = Field(
        description="bytes read and tokenized at a time (prepare streams: memory stays bounded)",
        gt=0,
    )
    num_threads: int = Field(
        description="threads for BPE encoding (tiktoken's batch API); 0: one per CPU", ge=0
    )

    @field_validator("tokenizer")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        # Checked with the configuration (no download): a typo is a setting to fix, found
        # before any command works.
        kind, _, name = value.partition(":")
        if kind == "tiktoken" and (problem := unknown_encoding(name)):
            raise ValueError(problem)
        return value

    @field_validator("source_sha256")
    @classmethod
    def _lower_case(cls, value: str) -> str:
        return value.lower()  # as hashlib writes it

    @property
    def encoding(self) -> str | None:
        """The tiktoken encoding named by ``tokenizer``; None for "char"."""
        kind, _, name = self.tokenizer.partition(":")
        return name if kind == "tiktoken" else None


def resolve_source(source: str | Path, source_sha256: str | None) -> list[Path]:
    """The corpus files of ``source``: a URL's cached download, a file, a folder or a glob."""
    if is_url(source):
        return [fetch(source, source_sha256)]
    path = Path(source).expanduser()
    if path.is_dir():
        if source_sha256:
            raise ConfigError(
                f"prepare.source_sha256 needs a single file, but {path} is a folder; "
                'set prepare.source_sha256 = "" or point prepare.source at one file'
            )
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {path} holds no *.txt files; fix prepare.source")
        return files
    if not path.exists() and glob.has_magic(str(path)):
        if source_sha256:
            raise ConfigError(
                f"prepare.source_sha256 needs a single file, but {path} is a glob pattern; "
                'set prepare.source_sha256 = "" or point prepare.source at one file'
            )
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no file matches the pattern {path}; fix prepare.source")
        return files
    path = fetch(path, source_sha256)
    if not path.is_file():
        raise DataError(f"source {path} is not a file; point prepare.source at a UTF-8 text file")
    return [path]


def _check_same_settings(meta: dict, settings: PrepareConfig, where: Path) -> None:
    encoding = settings.encoding
    have = (meta.get("tokenizer"), meta.get("encoding") if encoding else None)
    hint = "pass --force to rebuild them or choose another data.dataset_dir"
    if "tokenizer" in meta and have != ("char" if encoding is None else "tiktoken", encoding):
        got = have[0] if have[1] is None else f"{have[0]}:{have[1]}"
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
    encoding = settings.encoding
    tokenizer = "char" if encoding is None else TiktokenTokenizer(encoding)
    files = resolve_source(settings.source, settings.source_sha256 or None)
    meta = prepare_corpus(files, tokenizer, dataset_dir, settings, seed=seed, progress=progress)
    return True, meta
