"""The streaming preparer: any corpus (`sources.py`: text, JSONL, Parquet, local or behind an
fsspec URL), any tokenizer, any size.

Two passes over the text, each reading ``chunk_bytes`` at a time, so neither the corpus nor its
tokens are ever held in memory:

1. a scan counts characters and documents (and, for ``char``, collects the vocabulary);
2. the text is tokenized chunk by chunk and appended to growing temporary token files
   (:class:`ArtifactWriter`), renamed into place with ``meta.pkl`` written last.

Documents are the files, or the parts of each file between ``document_separator``. With BPE the
documents of a split are joined by the end-of-text token. Splits:

- ``contiguous``: nanoGPT's split, the first ``int(n_chars * (1 - val_fraction))`` characters of
  the concatenated text train and the rest validates (each part encoded on its own, exactly as
  nanoGPT's ``prepare.py`` does, so tinyshakespeare gives nanoGPT's token counts);
- ``documents``: ``round(n_docs * val_fraction)`` documents (at least one, never all), drawn by a
  ``numpy`` generator seeded with ``seed``, validate; the rest train, in corpus order.

BPE text is cut into pieces only where no encoding's pre-tokenizer joins across the cut (after
a newline between two non-space characters, or before a space that starts a word), so a small
chunk size gives exactly the tokens of encoding each document in one go.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ml_playground.errors import DataError
from ml_playground.prepare.artifacts import ArtifactWriter, TokenFile
from ml_playground.prepare.config import PrepareConfig
from ml_playground.prepare.sources import CorpusFile, corpus_file, iter_documents
from ml_playground.prepare.tokenizers import CharTokenizer, Tokenizer, build_tokenizer

# --------------------------------------------------------------------------- progress


def _bar(label: str, total_bytes: int, show: bool) -> tqdm:
    """A progress bar of bytes read on stderr (silent unless ``show``)."""
    return tqdm(
        total=total_bytes, desc=label, unit="B", unit_scale=True, disable=not show, file=sys.stderr
    )


# --------------------------------------------------------------------------- encoding


def _is_space(ch: str) -> bool:
    return ch.isspace()


def _safe_at(text: str, i: int) -> bool:
    """True when no tiktoken pre-tokenizer joins ``text[:i]`` and ``text[i:]`` across ``i``."""
    if i <= 1 or i >= len(text) - 1:
        return False
    ch = text[i]
    if text[i - 1] == "\n":  # "Y\nX": Y not blank, X a letter or digit
        return ch.isalnum() and not _is_space(text[i - 2])
    if ch == " ":  # "Y| X": a word starting with a space after a non-blank
        return text[i + 1].isalpha() and not _is_space(text[i - 1])
    return False


def _safe_cut(text: str, lo: int, hi: int) -> int | None:
    """The last safe cut in ``[lo, hi)``, else the first one at or after ``hi``, else None."""
    for sep in ("\n", " "):
        j = hi
        while (j := text.rfind(sep, lo, j)) >= 0:
            cut = j + 1 if sep == "\n" else j
            if _safe_at(text, cut):
                return cut
    for sep in ("\n", " "):
        j = hi - 1
        while (j := text.find(sep, j + 1)) >= 0:
            cut = j + 1 if sep == "\n" else j
            if _safe_at(text, cut):
                return cut
    return None


def cut_pieces(text: str, piece_chars: int, final: bool) -> tuple[list[str], str]:
    """Split ``text`` into pieces of about ``piece_chars`` at safe cuts; return (pieces, rest).

    Without ``final`` the tail after the last cut is returned as ``rest`` (more text of the same
    document follows); with it, the tail is the last piece.
    """
    pieces: list[str] = []
    start = 0
    while len(text) - start > piece_chars:
        cut = _safe_cut(text, start + 1, start + piece_chars)
        if cut is None:
            break
        pieces.append(text[start:cut])
        start = cut
    rest = text[start:]
    if final and rest:
        pieces.append(rest)
        rest = ""
    return pieces, rest


class _BpeStream:
    """Buffers one split's text, cuts it into pieces at safe places, and encodes the pieces of
    several documents together, `batch_chars` at a time, across threads; writes ids in order
    (each document's end marked by the end-of-text token)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        sink: TokenFile,
        chunk_chars: int,
        threads: int,
    ) -> None:
        self.tokenizer, self.sink = tokenizer, sink
        self.eot = tokenizer.eot_token
        self.threads = threads
        self.batch_chars = max(chunk_chars, 1)
        self.piece_chars = max(self.batch_chars // (4 * threads), 1)
        self.hard_limit = 8 * self.batch_chars + (1 << 20)
        self.buffer: list[str] = []  # the current document's text not yet cut
        self.size = 0
        # Pieces cut and waiting to be encoded; None marks a document's end. Documents shorter
        # than a batch (most web pages) share one batch, so the threads have pieces to share.
        self.pending: list[str | None] = []
        self.pending_chars = 0
        self.started = False

    def add(self, new_document: bool, text: str) -> None:
        if new_document and self.started:
            self._cut(final=True)
            if self.eot is not None:
                self.pending.append(None)
        self.started = True
        self.buffer.append(text)
        self.size += len(text)
        if self.size >= self.batch_chars:
            self._cut(final=False)
        if self.pending_chars >= self.batch_chars:
            self._encode()

    def finish(self) -> None:
        self._cut(final=True)
        self._encode()

    def _cut(self, final: bool) -> None:
        text = "".join(self.buffer)
        pieces, rest = cut_pieces(text, self.piece_chars, final)
        if len(rest) > self.hard_limit:  # no safe cut in a huge run: cut it anyway
            pieces += [
                rest[i : i + self.piece_chars] for i in range(0, len(rest), self.piece_chars)
            ]
            rest = ""
        self.buffer, self.size = ([rest], len(rest)) if rest else ([], 0)
        self.pending += pieces
        self.pending_chars += sum(len(piece) for piece in pieces)

    def _encode(self) -> None:
        if not self.pending:
            return
        pieces = [piece for piece in self.pending if piece is not None]
        encoded = iter(self.tokenizer.encode_batch(pieces, self.threads) if pieces else [])
        eot = np.array([self.eot], dtype=np.int64)
        self.sink.write(
            np.concatenate([eot if piece is None else next(encoded) for piece in self.pending])
        )
        self.pending, self.pending_chars = [], 0


class _CharStream:
    """Encodes a char vocabulary's text as it comes (any cut is a safe cut)."""

    def __init__(self, tokenizer: CharTokenizer, sink: TokenFile) -> None:
        self.tokenizer, self.sink = tokenizer, sink

    def add(self, new_document: bool, text: str) -> None:
        self.sink.write(self.tokenizer.encode_array(text))

    def finish(self) -> None:
        pass


def _training_pieces(routed: Iterable[tuple[int, bool, str]], piece_chars: int) -> Iterator[str]:
    """The training split's text in pieces cut only where tokens do not change (a BPE is
    trained on the pre-tokens it will see, whatever chunk_bytes is)."""
    buffer = ""
    for index, new, text in routed:
        if index != 0:
            continue
        if new and buffer:
            yield from cut_pieces(buffer, piece_chars, final=True)[0]
            buffer = ""
        pieces, buffer = cut_pieces(buffer + text, piece_chars, final=False)
        yield from pieces
    if buffer:
        yield from cut_pieces(buffer, piece_chars, final=True)[0]


# --------------------------------------------------------------------------- the preparer


def _split(
    documents: Iterable[tuple[bool, str]], split: str, cut: int, val_docs: np.ndarray
) -> Iterator[tuple[int, bool, str]]:
    """``(split index, starts_document, text)``: 0 trains, 1 validates."""
    doc, pos = -1, 0
    for new, text in documents:
        doc += new
        if split == "documents":
            yield int(val_docs[doc]), new, text
            continue
        end = pos + len(text)
        if end <= cut:
            yield 0, new, text
        elif pos >= cut:
            yield 1, new, text
        else:
            k = cut - pos
            yield 0, new, text[:k]
            yield 1, False, text[k:]
        pos = end


def prepare_corpus(
    sources: Sequence[CorpusFile | Path],
    tokenizer: str | Tokenizer,
    out_dir: Path,
    settings: PrepareConfig,
    *,
    seed: int,
    progress: bool = False,
) -> dict:
    """Tokenize ``sources`` (in order) into ``out_dir`` as ``settings`` say, streaming; return the
    meta written to ``meta.pkl``. ``settings.tokenizer`` is not read: ``tokenizer`` is a
    `prepare.tokenizer` value (built by the registry once the corpus is scanned) or a
    tokenizer; ``seed`` draws the validation documents of ``split = "documents"``."""
    files = [corpus_file(item) for item in sources]
    source, split, val_fraction = settings.source, settings.split, settings.val_fraction
    separator, chunk_bytes = settings.document_separator, settings.chunk_bytes
    if not files:
        raise DataError(f"{source} holds no files; point prepare.source at UTF-8 text")
    threads = settings.num_threads or os.cpu_count() or 1
    total_bytes = sum(file.size for file in files)
    read: dict[str, Any] = {
        "text_field": settings.text_field,
        "max_documents": settings.max_documents,
    }

    # Pass 1: characters, documents and (for a char tokenizer to build) the character set.
    n_chars = n_docs = 0
    chars: set[str] = set()
    char_vocabulary = tokenizer == CharTokenizer.kind  # the spec "char": built from them
    with _bar("prepare: scanning", total_bytes, progress) as scan:
        for new, text in iter_documents(files, separator, chunk_bytes, scan.update, **read):
            n_docs += new
            n_chars += len(text)
            if char_vocabulary:
                chars.update(text)
    if n_chars == 0:
        raise DataError(f"{source} is empty; give a non-empty UTF-8 text corpus")

    cut = int(n_chars * (1 - val_fraction))
    val_docs = np.zeros(0, dtype=bool)
    if split == "documents":
        if n_docs < 2:
            raise DataError(
                f"{source} holds {n_docs} document, but prepare.split = 'documents' needs at "
                "least 2: give a folder or glob of several files, set "
                "prepare.document_separator, or use prepare.split = 'contiguous'"
            )
        n_val = min(max(round(n_docs * val_fraction), 1), n_docs - 1)
        val_docs = np.zeros(n_docs, dtype=bool)
        val_docs[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True

    def training_texts() -> Iterator[str]:  # a pass of its own, for a tokenizer to learn
        documents = iter_documents(files, separator, chunk_bytes, **read)
        yield from _training_pieces(_split(documents, split, cut, val_docs), chunk_bytes)

    tok = (
        tokenizer
        if isinstance(tokenizer, Tokenizer)
        else build_tokenizer(tokenizer, sorted(chars), training_texts)
    )

    # Pass 2: tokenize into the growing token files.
    with (
        ArtifactWriter(Path(out_dir), tok.vocab_size) as writer,
        _bar("prepare: tokenizing", total_bytes, progress) as bar,
    ):
        sinks = (writer.train, writer.val)
        streams: list[_BpeStream | _CharStream]
        if isinstance(tok, CharTokenizer):  # any cut is safe, and numpy encodes it
            streams = [_CharStream(tok, sink) for sink in sinks]
        else:
            streams = [_BpeStream(tok, sink, chunk_bytes, threads) for sink in sinks]

        def on_bytes(n: int) -> None:
            bar.set_postfix_str(f"{writer.train.count + writer.val.count:,} tokens", refresh=False)
            bar.update(n)

        documents = iter_documents(files, separator, chunk_bytes, on_bytes, **read)
        for index, new, text in _split(documents, split, cut, val_docs):
            streams[index].add(new, text)
        for stream in streams:
            stream.finish()
        on_bytes(0)
        meta = {**tok.meta(), "split": split, "source": str(settings.source)}
        meta["val_fraction"] = val_fraction
        if split == "documents":
            meta.update(
                seed=seed,
                train_documents=int(n_docs - val_docs.sum()),
                val_documents=int(val_docs.sum()),
            )
        return writer.commit(meta)
