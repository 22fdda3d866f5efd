"""The `[prepare]` section: where the corpus comes from and how it is tokenized and split."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ml_playground.prepare.tokenizers import check_spec
from ml_playground.sections import Section, Source

Split = Literal["contiguous", "documents"]


class PrepareConfig(Section):
    """How `prepare` turns a raw corpus into train.bin / val.bin / meta.pkl."""

    source: Source = Field(
        description="the raw corpus: an http(s) URL (downloaded once into the cache), any "
        "fsspec URL (hf://datasets/<owner>/<name>/<glob>), a file, a folder (its *.txt, "
        "*.jsonl, *.jsonl.gz and *.parquet files, sorted) or a glob; .jsonl(.gz) and .parquet "
        "hold one document per record; relative paths resolve against the config file"
    )
    source_sha256: str = Field(
        description='expected sha256 of the raw corpus (hex, any case); "" skips the check',
        pattern=r"^([0-9a-fA-F]{64})?$",
    )
    tokenizer: str = Field(
        description='"char" (one token per character), "tiktoken:<encoding>" (e.g. '
        'tiktoken:gpt2), "hf:<tokenizer.json, a folder holding one, or a hub id>" (any Hugging '
        'Face fast tokenizer) or "bpe:<vocab_size>" (a byte-level BPE trained on the training '
        "split; its tokenizer.json goes into meta.pkl)"
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
    text_field: str = Field(
        description="the key (JSONL) or column (Parquet) that holds each document's text",
        min_length=1,
    )
    max_documents: int = Field(
        description="stop after this many documents (0 = all): try the first slice of a "
        "large corpus",
        ge=0,
    )
    num_threads: int = Field(
        description="threads for BPE encoding (tiktoken); 0: one per CPU", ge=0
    )

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, value: str) -> str:
        # Checked with the configuration (no download): a typo is a setting to fix, found
        # before any command works.
        if problem := check_spec(value):
            raise ValueError(problem)
        return value

    @field_validator("source_sha256")
    @classmethod
    def _lower_case(cls, value: str) -> str:
        return value.lower()  # as hashlib writes it
