"""Dataset preparation: fetch a corpus, tokenize it, write train.bin / val.bin / meta.pkl."""

from ml_playground.prepare.artifacts import (
    META_FORMAT_VERSION,
    NANOGPT_DEFAULT_META,
    ArtifactWriter,
    artifacts_ready,
    dataset_meta,
    dtype_for,
    is_nanogpt_gpt2_folder,
    load_tokens,
    prepare_text,
    read_meta,
    split_text,
    write_bin_and_meta,
)
from ml_playground.prepare.download import cache_dir, cached_path_for, fetch
from ml_playground.prepare.run import resolve_source, run_prepare
from ml_playground.prepare.shakespeare_char import (
    SHAKESPEARE_SHA256,
    SHAKESPEARE_URL,
    prepare_char_corpus,
)
from ml_playground.prepare.stream import SPLITS, iter_documents, prepare_corpus
from ml_playground.prepare.tokenizers import (
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    parse_tokenizer_spec,
    tokenizer_from_meta,
)

__all__ = [
    "META_FORMAT_VERSION",
    "NANOGPT_DEFAULT_META",
    "SHAKESPEARE_SHA256",
    "SHAKESPEARE_URL",
    "SPLITS",
    "ArtifactWriter",
    "CharTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "artifacts_ready",
    "cache_dir",
    "cached_path_for",
    "dataset_meta",
    "dtype_for",
    "fetch",
    "is_nanogpt_gpt2_folder",
    "iter_documents",
    "load_tokens",
    "parse_tokenizer_spec",
    "prepare_char_corpus",
    "prepare_corpus",
    "prepare_text",
    "read_meta",
    "resolve_source",
    "run_prepare",
    "split_text",
    "tokenizer_from_meta",
    "write_bin_and_meta",
]
