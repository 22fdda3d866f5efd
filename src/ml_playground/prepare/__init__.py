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
    read_meta,
    write_bin_and_meta,
)
from ml_playground.prepare.config import PrepareConfig
from ml_playground.prepare.download import cache_dir, cached_path_for, fetch
from ml_playground.prepare.run import run_prepare
from ml_playground.prepare.sources import CorpusFile, iter_documents, resolve_source
from ml_playground.prepare.stream import prepare_corpus
from ml_playground.prepare.tokenizers import (
    CharTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    tokenizer_from_meta,
)

__all__ = [
    "META_FORMAT_VERSION",
    "NANOGPT_DEFAULT_META",
    "ArtifactWriter",
    "CharTokenizer",
    "CorpusFile",
    "PrepareConfig",
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
    "prepare_corpus",
    "read_meta",
    "resolve_source",
    "run_prepare",
    "tokenizer_from_meta",
    "write_bin_and_meta",
]
