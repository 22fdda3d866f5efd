"""Dataset preparation: fetch a corpus, tokenize it, write train.bin / val.bin / meta.pkl."""

from ml_playground.prepare.artifacts import (
    META_FORMAT_VERSION,
    artifacts_ready,
    load_tokens,
    prepare_text,
    read_meta,
    split_text,
    write_bin_and_meta,
)
from ml_playground.prepare.download import cache_dir, cached_path_for, fetch
from ml_playground.prepare.run import run_prepare
from ml_playground.prepare.shakespeare_char import (
    SHAKESPEARE_SHA256,
    SHAKESPEARE_URL,
    prepare_char_corpus,
)
from ml_playground.prepare.tokenizers import (
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    parse_tokenizer_spec,
    tokenizer_from_meta,
)

__all__ = [
    "META_FORMAT_VERSION",
    "SHAKESPEARE_SHA256",
    "SHAKESPEARE_URL",
    "CharTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "artifacts_ready",
    "cache_dir",
    "cached_path_for",
    "fetch",
    "load_tokens",
    "parse_tokenizer_spec",
    "prepare_char_corpus",
    "prepare_text",
    "read_meta",
    "run_prepare",
    "split_text",
    "tokenizer_from_meta",
    "write_bin_and_meta",
]
