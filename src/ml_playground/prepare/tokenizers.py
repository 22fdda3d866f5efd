"""Tokenizers that turn text into token ids and back: nanoGPT's character level, tiktoken BPE,
and Hugging Face fast tokenizers (`tokenizers`): any `tokenizer.json` (`hf:`) or a byte-level
BPE trained on the corpus (`bpe:<vocab_size>`).

The one registry of kinds: `check_spec` (a `prepare.tokenizer` value), `build_tokenizer` (for
`prepare`), `tokenizer_from_meta` (everything after it). Each tokenizer describes itself as the
dict stored in ``meta.pkl`` (and so in every checkpoint) and is rebuilt from it alone.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, TypeVar

import numpy as np
import tiktoken

from ml_playground.errors import ConfigError, DataError, SamplingError

_EOT = "<|endoftext|>"
_MAX_LISTED = 10
GPT2_FILES = {  # tiktoken's own copies of GPT-2's BPE files, as transformers names them
    "vocab.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "merges.txt": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
}
HF_FILES = ("tokenizer.json", "tokenizer_config.json")
BPE_MIN, BPE_MAX = 257, 1 << 20  # the 256 bytes and the end-of-text token; a uint32's worth


class Tokenizer(ABC):
    """Text ↔ token ids, plus the meta dict that lets it be rebuilt."""

    kind: ClassVar[str]  # meta.pkl's "tokenizer"
    cuts_anywhere: ClassVar[bool] = False  # text may be cut anywhere (char), else at safe cuts

    @property
    def eot_token(self) -> int | None:
        """The token that joins the documents of a split (None: they are concatenated)."""
        return None

    def encode_batch(self, texts: Sequence[str], num_threads: int) -> list[np.ndarray]:
        """Token ids of independent texts, an integer array each."""
        return [np.asarray(self.encode(text), dtype=np.int64) for text in texts]

    def export_files(self, context: int) -> dict[str, bytes]:
        """The files beside exported weights that let `transformers` decode (none: nothing)."""
        return {}

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
            "tokenizer": self.kind,
            "encoding": self.encoding_name,
            **self._tables(),
        }


def _listed(items: Sequence[object]) -> str:
    shown = ", ".join(repr(x) for x in items[:_MAX_LISTED])
    return shown + (f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


class CharTokenizer(Tokenizer):
    """One token per character; ids follow the order of ``chars`` (sorted, as nanoGPT does)."""

    kind = "char"
    cuts_anywhere = True

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

    def encode_array(self, text: str) -> np.ndarray:
        """The ids of `text` at numpy speed (every character must be in the vocabulary)."""
        if not hasattr(self, "_points"):
            order = sorted(range(len(self._itos)), key=lambda i: ord(self._itos[i]))
            self._points = np.array([ord(self._itos[i]) for i in order], dtype=np.uint32)
            self._ids = np.array(order, dtype=np.int64)
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        return self._ids[np.searchsorted(self._points, points)]

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

    def export_files(self, context: int) -> dict[str, bytes]:
        return {"char_vocab.json": json.dumps(self._itos, ensure_ascii=False).encode()}


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

    kind = "tiktoken"

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

    def export_files(self, context: int) -> dict[str, bytes]:
        """GPT-2's BPE files, as transformers names them (tiktoken's own copies, cached)."""
        if self._enc.name not in ("gpt2", "r50k_base"):
            return {}
        from tiktoken.load import read_file_cached

        files = {name: read_file_cached(url) for name, url in GPT2_FILES.items()}
        settings = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": context}
        settings |= {key: _EOT for key in ("bos_token", "eos_token", "unk_token")}
        files["tokenizer_config.json"] = json.dumps(settings, indent=2).encode()
        return files

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int) -> list[np.ndarray]:
        """Encode independent texts across ``num_threads`` threads. `encode_to_numpy` with no
        special token allowed or disallowed is `encode_ordinary`, returned as the Rust side's
        uint32 buffer: no Python int per token (about 15% faster than the batch API's lists)."""

        def encode(text: str) -> np.ndarray:
            return self._enc.encode_to_numpy(text, disallowed_special=())

        if num_threads <= 1 or len(texts) <= 1:
            return [encode(text) for text in texts]
        # tiktoken releases the GIL while it encodes. New threads per batch, as tiktoken's own
        # batch API: threads kept across batches encoded 2.3x slower here (0.80 s against
        # 0.34 s for 40 documents of 200 KB, slower than one thread), measured, not explained.
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(encode, texts))

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return self._enc.decode(list(ids))
        except (KeyError, ValueError, OverflowError) as e:
            raise SamplingError(
                f"cannot decode token ids with tiktoken encoding {self._enc.name!r} ({e})"
            ) from None

    def _tables(self) -> dict:
        return {"eot_token": self.eot_token}


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (`tokenizer.json`, the `tokenizers` library): loaded from a
    file or the hub (`hf:`), or a byte-level BPE trained on the corpus (`bpe:`). Special tokens
    in the text are encoded as ordinary text; its `tokenizer.json` travels in meta.pkl."""

    kind = "hf"

    def __init__(self, tokenizer_json: str, spec: str) -> None:
        from tokenizers import Tokenizer as Fast

        try:
            self._tok = Fast.from_str(tokenizer_json)
        except Exception as exc:  # the Rust side raises a bare Exception
            raise DataError(
                f"{spec}: not a readable tokenizer.json ({str(exc).splitlines()[0][:160]}); "
                "give a Hugging Face tokenizer.json, or prepare again with --force"
            ) from None
        self.json_text, self.spec = tokenizer_json, spec
        eot = next(
            (t for t in (_EOT, "</s>", "<eos>") if self._tok.token_to_id(t) is not None), None
        )
        self._eot_id = None if eot is None else self._tok.token_to_id(eot)
        self._eot_text = eot

    @classmethod
    def load(cls, where: str) -> HFTokenizer:
        """`where`: a tokenizer.json file, a folder holding one, or a hub id (fetched once)."""
        path = Path(where).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            if path.exists() or where.count("/") > 1 or where.startswith((".", "/", "~")):
                raise ConfigError(f"prepare.tokenizer = hf:{where}: no tokenizer.json there")
            from huggingface_hub import hf_hub_download

            try:
                path = Path(hf_hub_download(where, "tokenizer.json"))
            except Exception as exc:
                raise DataError(
                    f"could not fetch tokenizer.json of {where!r} from the Hugging Face hub "
                    f"({str(exc).splitlines()[0][:160]}); without network, give hf:<path to a "
                    "tokenizer.json> instead"
                ) from None
        return cls(path.read_text(encoding="utf-8"), f"hf:{where}")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> HFTokenizer:
        """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) of `vocab_size` tokens,
        the last one `<|endoftext|>`, trained on `texts` (streamed)."""
        from tokenizers import Tokenizer as Fast
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = Fast(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 1,  # the end-of-text token is added after the merges
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        tok.add_special_tokens([_EOT])
        if tok.get_vocab_size() < vocab_size:
            raise DataError(
                f"prepare.tokenizer = bpe:{vocab_size}: the training split has only enough "
                f"distinct text for {tok.get_vocab_size()} tokens; lower the vocabulary to at "
                "most that, or give a larger corpus"
            )
        return cls(tok.to_str(), f"bpe:{vocab_size}")

    @classmethod
    def from_meta(cls, meta: dict) -> HFTokenizer:
        text = meta.get("tokenizer_json")
        if not isinstance(text, str):
            raise DataError(
                "meta.pkl names tokenizer 'hf' but holds no tokenizer.json; rebuild it with "
                "`ml-playground prepare --force`"
            )
        return _matching_vocab(meta, cls(text, str(meta.get("spec", "hf"))), "its tokenizer.json")

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eot_token(self) -> int | None:
        return self._eot_id

    @property
    def encoding_name(self) -> None:
        return None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str], num_threads: int) -> list[np.ndarray]:
        # The Rust side runs the batch on its own threads (TOKENIZERS_PARALLELISM).
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        try:
            return str(self._tok.decode(list(ids), skip_special_tokens=False))
        except (OverflowError, TypeError, ValueError) as e:
            raise SamplingError(f"cannot decode token ids with {self.spec} ({e})") from None

    def _tables(self) -> dict:
        return {"tokenizer_json": self.json_text, "spec": self.spec, "eot_token": self.eot_token}

    def export_files(self, context: int) -> dict[str, bytes]:
        settings: dict[str, object] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": context,
        }
        if self._eot_text is not None:
            settings |= {key: self._eot_text for key in ("bos_token", "eos_token")}
        return {
            "tokenizer.json": self.json_text.encode("utf-8"),
            "tokenizer_config.json": json.dumps(settings, indent=2).encode(),
        }


# --------------------------------------------------------------------------- the registry


def check_spec(spec: str) -> str | None:
    """What is wrong with a `prepare.tokenizer` value (None: nothing); no network, no files."""
    kind, _, arg = spec.partition(":")
    if spec == "char":
        return None
    if kind == "tiktoken":
        return unknown_encoding(arg)
    if kind == "hf" and arg:
        return None
    if kind == "bpe" and arg.isdigit():
        if not BPE_MIN <= int(arg) <= BPE_MAX:
            return (
                f"bpe:{arg}: a byte-level BPE has from {BPE_MIN} tokens (the 256 bytes and "
                f"<|endoftext|>) to {BPE_MAX:,}; choose a vocabulary in that range"
            )
        return None
    return (
        f"unknown tokenizer {spec!r}; use char, tiktoken:<encoding>, hf:<tokenizer.json or hub "
        "id> or bpe:<vocab_size>"
    )


def build_tokenizer(
    spec: str, chars: Sequence[str], training_texts: Callable[[], Iterable[str]]
) -> Tokenizer:
    """The tokenizer `prepare` writes with: `chars` are the corpus's characters (char),
    `training_texts` streams the training split (bpe)."""
    if problem := check_spec(spec):
        raise ConfigError(f"prepare.tokenizer: {problem}")
    kind, _, arg = spec.partition(":")
    if kind == "char":
        return CharTokenizer(sorted(chars))
    if kind == "tiktoken":
        return TiktokenTokenizer(arg)
    if kind == "hf":
        return HFTokenizer.load(arg)
    return HFTokenizer.train(training_texts(), int(arg))


def spec_of(meta: dict) -> str:
    """The `prepare.tokenizer` value a meta.pkl was written with."""
    kind = meta.get("tokenizer", "char")
    if kind == "tiktoken":
        return f"tiktoken:{meta.get('encoding')}"
    return str(meta.get("spec", kind))


KINDS: dict[str, type[Tokenizer]] = {
    "char": CharTokenizer,
    "tiktoken": TiktokenTokenizer,
    "hf": HFTokenizer,
}


def tokenizer_from_meta(meta: dict) -> Tokenizer:
    """Rebuild the tokenizer described by a ``meta.pkl`` dict (see ``read_meta``)."""
    if not isinstance(meta, dict):
        raise DataError(f"the tokenizer's metadata is a {type(meta).__name__}, not a table")
    kind = meta.get("tokenizer", "char" if "stoi" in meta or "itos" in meta else None)
    if kind == "tiktoken":
        name = meta.get("encoding")
        if not isinstance(name, str) or unknown_encoding(name):
            raise DataError(
                f"meta.pkl names tokenizer 'tiktoken' but no encoding tiktoken knows (got "
                f"{name!r}); "
                "rebuild it with `ml-playground prepare --force`"
            )
        return _matching_vocab(meta, TiktokenTokenizer(name), f"tiktoken {name!r}")
    if kind in KINDS:
        return KINDS[kind].from_meta(meta)  # type: ignore[attr-defined]
    raise DataError(
        f"meta.pkl names an unknown tokenizer {kind!r} (expected one of {', '.join(KINDS)}); "
        "rebuild it with `ml-playground prepare --force`"
    )


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two meta dicts describe the same tokenizer, by content, not by size."""
    keys = ("tokenizer", "encoding", "itos", "tokenizer_json")
    return all(a.get(key) == b.get(key) for key in keys)


_T = TypeVar("_T", bound=Tokenizer)


def _matching_vocab(meta: dict, tokenizer: _T, what: str) -> _T:
    """The tokenizer, if meta.pkl's vocab_size agrees with it."""
    if meta.get("vocab_size") != tokenizer.vocab_size:
        raise DataError(
            f"meta.pkl says vocab_size {meta.get('vocab_size')} but {what} has "
            f"{tokenizer.vocab_size} tokens; rebuild it with `ml-playground prepare --force`"
        )
    return tokenizer
