"""Tokenizers that turn text into token ids and back: nanoGPT's character level and tiktoken BPE.

Each one describes itself as the dict stored in ``meta.pkl`` and can be rebuilt from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TypeVar

import tiktoken

from ml_playground.errors import ConfigError, DataError, SamplingError

_EOT = "<|endoftext|>"
_MAX_LISTED = 10


class Tokenizer(ABC):
    """Text ↔ token ids, plus the meta dict that lets it be rebuilt."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct token ids."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for ``text``."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text for token ids."""

    @property
    @abstractmethod
    def encoding_name(self) -> str | None:
        """The tiktoken encoding, or None for a char vocabulary."""

    @abstractmethod
    def _tables(self) -> dict:
        """What besides the common keys rebuilds this tokenizer from ``meta.pkl``."""

    def meta(self) -> dict:
        """What goes into ``meta.pkl``."""
        return {
            "vocab_size": self.vocab_size,
            "tokenizer": "char" if self.encoding_name is None else "tiktoken",
            "encoding": self.encoding_name,
            **self._tables(),
        }


def _listed(items: Sequence[object]) -> str:
    shown = ", ".join(repr(x) for x in items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


class CharTokenizer(Tokenizer):
    """One token per character; ids follow the order of ``chars`` (sorted, as nanoGPT does)."""

    def __init__(self, chars: Sequence[str]) -> None:
        if not chars or any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise DataError("a char vocabulary must be a non-empty list of distinct characters")
        self._itos = list(chars)
        self._stoi = {ch: i for i, ch in enumerate(self._itos)}

    @classmethod
    def from_meta(cls, meta: dict) -> CharTokenizer:
        """Rebuild from nanoGPT-style ``itos`` (or ``stoi``) in ``meta``."""
        itos, stoi = meta.get("itos"), meta.get("stoi")
        try:
            if isinstance(itos, dict):
                chars = [itos[i] for i in range(len(itos))]
            elif isinstance(stoi, dict):
                chars = [ch for ch, _ in sorted(stoi.items(), key=lambda kv: kv[1])]
                if [stoi[ch] for ch in chars] != list(range(len(chars))):
                    raise KeyError
            else:
                raise KeyError
            if not all(isinstance(ch, str) and ch for ch in chars):
                raise TypeError
        except (KeyError, TypeError):
            raise DataError(
                "meta.pkl has no usable 'itos'/'stoi' for the char tokenizer (ids must be 0..n-1,"
                " entries text); rebuild it with `ml-playground prepare --force`"
            ) from None
        return _matching_vocab(meta, cls(chars), "its char table")

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    def encode(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[ch] for ch in text]
        except KeyError:
            unknown = sorted(set(text) - stoi.keys())
            raise SamplingError(
                f"characters not in the vocabulary: {_listed(unknown)}; a char model only knows "
                "the characters of its training corpus's vocabulary"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        itos = self._itos
        try:
            return "".join(itos[i] for i in ids)
        except (IndexError, TypeError):
            bad = sorted({i for i in ids if not 0 <= i < len(itos)})
            raise SamplingError(
                f"token ids outside the char vocabulary 0..{len(itos) - 1}: {_listed(bad)}"
            ) from None

    @property
    def encoding_name(self) -> None:
        return None

    def _tables(self) -> dict:
        return {"itos": dict(enumerate(self._itos)), "stoi": dict(self._stoi)}


def unknown_encoding(name: str) -> str | None:
    """What is wrong with tiktoken encoding ``name`` (None: nothing). Asks tiktoken's registry
    only, so it costs no download and can run while the configuration is validated."""
    known = tiktoken.list_encoding_names()
    if name in known:
        return None
    return (
        f"unknown tiktoken encoding {name!r}; use tiktoken:<encoding> with one of tiktoken's "
        f"encodings ({', '.join(known)}) or char"
    )


def _get_encoding(name: str) -> tiktoken.Encoding:
    if problem := unknown_encoding(name):
        raise ConfigError(f"prepare.tokenizer: {problem}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        request = getattr(e, "request", None)
        url = getattr(request, "url", None)
        what = f"downloading {url} failed" if url else "its files could not be loaded"
        raise DataError(
            f"could not load tiktoken encoding {name!r}: {what} ({type(e).__name__}); "
            "without network, set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cache "
            "files for it (e.g. TIKTOKEN_CACHE_DIR=../shared/data/tiktoken_cache, each file "
            "named by the sha1 of its URL), or allow network access once"
        ) from None


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE encoding; special tokens in the text are encoded as ordinary text."""

    def __init__(self, encoding: str | tiktoken.Encoding) -> None:
        self._enc = _get_encoding(encoding) if isinstance(encoding, str) else encoding

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def encoding_name(self) -> str:
        return self._enc.name

    @property
    def eot_token(self) -> int | None:
        """The id of ``<|endoftext|>`` (the document separator), if the encoding has one."""
        if _EOT in self._enc.special_tokens_set:
            return self._enc.encode_single_token(_EOT)
        return None

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int) -> list[list[int]]:
        """Encode independent texts across ``num_threads`` threads (tiktoken's batch API)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self._enc.decode(list(ids))
        except (KeyError, ValueError, OverflowError) as e:
            raise SamplingError(
                f"cannot decode token ids with tiktoken encoding {self._enc.name!r} ({e})"
            ) from None

    def _tables(self) -> dict:
        return {"eot_token": self.eot_token}


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """Rebuild the tokenizer described by a ``meta.pkl`` dict (see ``read_meta``)."""
    if not isinstance(meta, dict):
        raise DataError(f"the tokenizer's metadata is a {type(meta).__name__}, not a table")
    kind = meta.get("tokenizer", "char" if "stoi" in meta or "itos" in meta else None)
    if kind == "char":
        return CharTokenizer.from_meta(meta)
    if kind == "tiktoken":
        name = meta.get("encoding")
        if not isinstance(name, str) or unknown_encoding(name):
            raise DataError(
                f"meta.pkl names tokenizer 'tiktoken' but no encoding tiktoken knows (got "
                f"{name!r}); "
                "rebuild it with `ml-playground prepare --force`"
            )
        return _matching_vocab(meta, TiktokenTokenizer(name), f"tiktoken {name!r}")
    raise DataError(
        f"meta.pkl names an unknown tokenizer {kind!r} (expected 'char' or 'tiktoken'); "
        "rebuild it with `ml-playground prepare --force`"
    )


_T = TypeVar("_T", bound=Tokenizer)


def _matching_vocab(meta: dict, tokenizer: _T, what: str) -> _T:
    """The tokenizer, if meta.pkl's vocab_size agrees with it."""
    if meta.get("vocab_size") != tokenizer.vocab_size:
        raise DataError(
            f"meta.pkl says vocab_size {meta.get('vocab_size')} but {what} has "
            f"{tokenizer.vocab_size} tokens; rebuild it with `ml-playground prepare --force`"
        )
    return tokenizer
