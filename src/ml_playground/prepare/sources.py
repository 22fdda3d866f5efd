"""Corpora as people keep them, read as one stream of documents: UTF-8 text files, JSONL
(gzipped or not) and Parquet files, one at a time or as folders and globs, on disk or behind
any fsspec URL (`hf://datasets/<owner>/<name>/<glob>` through huggingface_hub's HfFileSystem).

A text file is one document (or, with a separator, each part between separators); a JSONL line
or a Parquet row is one document, its `text_field`. Everything streams: text `chunk_bytes` at
a time, JSONL a line at a time, Parquet a row group at a time (pyarrow).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec

from ml_playground.errors import ConfigError, DataError
from ml_playground.prepare.download import cache_dir, fetch
from ml_playground.sections import is_url

RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
FOLDER_PATTERNS = ("*.txt", *(f"*{suffix}" for suffix in RECORD_SUFFIXES))
OFFLINE_HINT = (
    "without network, download the files once (for the hub: `hf download --repo-type dataset "
    "<owner>/<name> --include '<glob>' --local-dir DIR`) and set prepare.source to that "
    "folder or a glob in it"
)


@dataclass(frozen=True, order=True)
class CorpusFile:
    """One file of a corpus: a local path or an fsspec URL, and its size in bytes."""

    location: str
    size: int

    def __fspath__(self) -> str:
        return self.location

    @property
    def name(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    @property
    def kind(self) -> str:
        """The reader for the file, by its suffix: jsonl, parquet or text."""
        name = self.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            return "jsonl"
        return "parquet" if name.endswith(".parquet") else "text"


def _local(path: Path) -> CorpusFile:
    return CorpusFile(str(path), path.stat().st_size)


def corpus_file(item: CorpusFile | Path) -> CorpusFile:
    """A local path as a CorpusFile (a CorpusFile as it is)."""
    return item if isinstance(item, CorpusFile) else _local(Path(item))


def resolve_source(source: str | Path, source_sha256: str | None) -> list[CorpusFile]:
    """The corpus files of ``source``: an http(s) URL's cached download, another fsspec URL
    (a file, a folder or a glob), or a local file, folder or glob."""
    text = os.fspath(source)
    several = glob.has_magic(text) or (not is_url(text) and Path(text).expanduser().is_dir())
    if source_sha256 and (several or ("://" in text and not is_url(text))):
        raise ConfigError(
            f"prepare.source_sha256 needs a single file (local or an http(s) download), but "
            f'{text} names several or a remote one; set prepare.source_sha256 = "" or point '
            "prepare.source at one file"
        )
    if is_url(text):
        return [_local(fetch(text, source_sha256))]
    if "://" in text:
        return _remote(text)
    path = Path(text).expanduser()
    if path.is_dir():
        found = {p for pattern in FOLDER_PATTERNS for p in path.rglob(pattern) if p.is_file()}
        if not found:
            raise DataError(
                f"folder {path} holds no *.txt, *.jsonl, *.jsonl.gz or *.parquet files; "
                "fix prepare.source"
            )
        return [_local(p) for p in sorted(found)]
    if not path.exists() and glob.has_magic(text):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no file matches the pattern {path}; fix prepare.source")
        return [_local(p) for p in files]
    path = fetch(path, source_sha256)
    if not path.is_file():
        raise DataError(f"source {path} is not a file; point prepare.source at a corpus file")
    return [_local(path)]


def _remote(url: str) -> list[CorpusFile]:
    """The files an fsspec URL names: one file, every corpus file below a folder, or a glob."""
    protocol = url.split("://", 1)[0]
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise ConfigError(
            f"prepare.source = {url}: no filesystem for {protocol}:// ({exc}); install the "
            "fsspec package for it, or use a local path"
        ) from None
    try:
        if glob.has_magic(path):
            paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
        elif fs.isdir(path):
            paths = sorted(
                p
                for pattern in FOLDER_PATTERNS
                for p in fs.glob(f"{path.rstrip('/')}/**/{pattern}")
            )
        else:
            paths = [path] if fs.exists(path) else []
        files = [CorpusFile(fs.unstrip_protocol(p), int(fs.size(p) or 0)) for p in paths]
    except (OSError, ConnectionError) as exc:  # OfflineModeIsEnabled is a ConnectionError
        raise DataError(f"cannot reach {url} ({_first_line(exc)}); {OFFLINE_HINT}") from None
    except Exception as exc:  # httpx and the hub raise their own network errors
        if "connect" in type(exc).__name__.lower() or "network" in type(exc).__name__.lower():
            raise DataError(f"cannot reach {url} ({_first_line(exc)}); {OFFLINE_HINT}") from None
        raise
    if not files:
        raise DataError(f"no file matches {url}; fix prepare.source")
    return files


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --------------------------------------------------------------------------- reading


@contextmanager
def _opened(file: CorpusFile) -> Iterator[IO[bytes]]:
    """The file's bytes. A remote file goes through fsspec's `simplecache` (under the download
    cache), so the second pass of `prepare` reads it from disk instead of the network."""
    location, options = file.location, {}
    if "://" in location:
        location = f"simplecache::{location}"
        options = {"simplecache": {"cache_storage": str(cache_dir() / "remote")}}
    try:
        with fsspec.open(location, "rb", **options) as handle:
            yield handle
    except OSError as exc:
        raise DataError(
            f"cannot read {file.location} ({exc.strerror or _first_line(exc)}); check the path "
            "and permissions"
        ) from None


def _text_chunks(
    file: CorpusFile, chunk_bytes: int, on_bytes: Callable[[int], None]
) -> Iterator[str]:
    """Decoded text of a text file, ``chunk_bytes`` at a time (strict UTF-8)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    with _opened(file) as handle:
        while True:
            raw = handle.read(chunk_bytes)
            final = not raw
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{file.location} is not valid UTF-8 (near byte {offset + e.start}: "
                    f"{e.reason}); convert it to UTF-8"
                ) from None
            offset += len(raw)
            on_bytes(len(raw))
            if text:
                yield text
            if final:
                return


def _text_documents(
    file: CorpusFile, separator: str, chunk_bytes: int, on_bytes: Callable[[int], None]
) -> Iterator[tuple[bool, str]]:
    """A text file's documents: the file, or each part between separators."""
    keep = max(len(separator) - 1, 0)
    new, carry = True, ""
    for chunk in _text_chunks(file, chunk_bytes, on_bytes):
        if not separator:
            yield new, chunk
            new = False
            continue
        parts = (carry + chunk).split(separator)
        carry = parts.pop()
        for part in parts:
            if part:
                yield new, part
            new = True
        if len(carry) > max(chunk_bytes, keep + 1):  # a long document: pass most of it on
            head, carry = carry[: len(carry) - keep], carry[len(carry) - keep :]
            yield new, head
            new = False
    if carry:
        yield new, carry


def _record_text(file: CorpusFile, where: str, record: Any, field: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{file.location}: {where} is not a JSON object; one object per line")
    if field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise DataError(
            f"{file.location}: {where} has no {field!r} (its keys: {keys}); set "
            "prepare.text_field to the key that holds the text"
        )
    return _checked_text(file, where, record[field], field)


def _checked_text(file: CorpusFile, where: str, value: Any, field: str) -> str:
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise DataError(
            f"{file.location}: {where}: {field!r} is {got}, not text; fix the record or "
            "prepare.text_field"
        )
    return value


def _jsonl_texts(file: CorpusFile, field: str, on_bytes: Callable[[int], None]) -> Iterator[str]:
    with _opened(file) as raw:
        gz = file.name.lower().endswith(".gz")
        handle: IO[bytes] = gzip.GzipFile(fileobj=raw) if gz else raw  # type: ignore[assignment]
        read = 0
        try:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    reason = exc.msg if isinstance(exc, json.JSONDecodeError) else exc.reason
                    raise DataError(
                        f"{file.location}: line {number} is not JSON ({reason}); JSONL holds "
                        "one JSON object per line"
                    ) from None
                yield _record_text(file, f"line {number}", record, field)
                position = raw.tell()
                on_bytes(position - read)
                read = position
        except (gzip.BadGzipFile, EOFError) as exc:
            raise DataError(f"{file.location} is not a whole gzip file ({exc})") from None


def _parquet_texts(file: CorpusFile, field: str, on_bytes: Callable[[int], None]) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _opened(file) as handle:
        try:
            parquet = pq.ParquetFile(handle)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{file.location} is not a Parquet file ({exc})") from None
        names = parquet.schema_arrow.names
        if field not in names:
            raise DataError(
                f"{file.location} has no column {field!r} (its columns: {', '.join(names)}); "
                "set prepare.text_field to the column that holds the text"
            )
        row = 0
        for group in range(parquet.num_row_groups):  # memory: one row group's column
            column = parquet.read_row_group(group, columns=[field]).column(0)
            for value in column.to_pylist():
                row += 1
                yield _checked_text(file, f"row {row}", value, field)
            on_bytes(parquet.metadata.row_group(group).total_byte_size)


def iter_documents(
    files: Sequence[CorpusFile | Path],
    separator: str,
    chunk_bytes: int,
    on_bytes: Callable[[int], None] = lambda n: None,
    *,
    text_field: str = "text",
    max_documents: int = 0,
) -> Iterator[tuple[bool, str]]:
    """``(starts_document, text)`` pieces of the corpus, in order, at most ``chunk_bytes``
    characters each; empty documents are skipped; ``max_documents`` (0 = all) stops early."""
    documents = 0
    for item in files:
        file = corpus_file(item)
        if file.kind == "text":
            pieces = _text_documents(file, separator, chunk_bytes, on_bytes)
        else:
            read = _jsonl_texts if file.kind == "jsonl" else _parquet_texts
            pieces = _pieces(read(file, text_field, on_bytes), chunk_bytes)
        for new, text in pieces:
            if new:
                if max_documents and documents == max_documents:
                    return
                documents += 1
            yield new, text


def _pieces(texts: Iterator[str], chunk_bytes: int) -> Iterator[tuple[bool, str]]:
    """Each record's text as one document, cut into pieces of at most ``chunk_bytes``."""
    for text in texts:
        for start in range(0, len(text), chunk_bytes):
            yield start == 0, text[start : start + chunk_bytes]
