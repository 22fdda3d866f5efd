"""The ``prepare`` step: fetch the corpus, tokenize it and write the dataset artifacts.

It does nothing when valid artifacts for the same tokenizer already exist (unless forced).
"""

from __future__ import annotations

from pathlib import Path

from ml_playground.errors import DataError
from ml_playground.prepare.artifacts import META_FILE, artifacts_ready, prepare_text, read_meta
from ml_playground.prepare.download import fetch
from ml_playground.prepare.shakespeare_char import prepare_char_corpus
from ml_playground.prepare.tokenizers import TiktokenTokenizer, parse_tokenizer_spec


def _read_corpus(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"source {path} is not a file; point prepare.source at a UTF-8 text file")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not valid UTF-8 (byte {e.start}: {e.reason}); convert it to UTF-8"
        ) from None
    except OSError as e:
        raise DataError(
            f"cannot read {path} ({e.strerror}); check the path and permissions"
        ) from None


def _check_same_tokenizer(meta: dict, kind: str, encoding: str | None, dataset_dir: Path) -> None:
    have = (meta.get("tokenizer"), meta.get("encoding") if kind == "tiktoken" else None)
    if "tokenizer" in meta and have != (kind, encoding):
        want = kind if encoding is None else f"{kind}:{encoding}"
        got = have[0] if have[1] is None else f"{have[0]}:{have[1]}"
        raise DataError(
            f"{dataset_dir} holds artifacts for tokenizer {got!r} but prepare.tokenizer is "
            f"{want!r}; pass --force to rebuild them or choose another data.dataset_dir"
        )


def run_prepare(
    source: str | Path,
    source_sha256: str | None,
    tokenizer: str,
    val_fraction: float,
    dataset_dir: Path,
    force: bool = False,
) -> tuple[bool, dict]:
    """Prepare ``dataset_dir`` from ``source``; return ``(did_work, meta)``."""
    kind, encoding = parse_tokenizer_spec(tokenizer)
    dataset_dir = Path(dataset_dir)
    if not force and artifacts_ready(dataset_dir):
        meta = read_meta(dataset_dir / META_FILE)
        _check_same_tokenizer(meta, kind, encoding, dataset_dir)
        return False, meta
    path = fetch(source, source_sha256)
    text = _read_corpus(path)
    if kind == "char":
        return True, prepare_char_corpus(text, dataset_dir, val_fraction, source=str(path))
    assert encoding is not None
    tok = TiktokenTokenizer(encoding)
    return True, prepare_text(text, tok, dataset_dir, val_fraction, source=str(path))
