"""Dataset artifacts: ``train.bin`` / ``val.bin`` (flat token ids, nanoGPT layout) and ``meta.pkl``.

Everything is written atomically (temp file, fsync, rename); ``meta.pkl`` is written last.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ml_playground.errors import DataError
from ml_playground.files import fsync_dir, sync_and_close, temporary_name, write_atomic

META_FORMAT_VERSION = 1
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
META_FILE = "meta.pkl"
MIN_SPLIT_TOKENS = 2  # one (input, target) pair
_DTYPES = ("uint16", "uint32")


class _PlainDataUnpickler(pickle.Unpickler):
    """Admits only what pickle builds without importing anything: plain containers and scalars."""

    def find_class(self, module: str, name: str) -> Any:
        raise DataError(
            f"meta.pkl references {module}.{name}; refusing to load: "
            "meta.pkl may only hold plain Python data"
        )


def _loads_plain(data: bytes) -> Any:
    return _PlainDataUnpickler(io.BytesIO(data)).load()


def check_vocab_size(value: object, what: str, fix: str) -> int:
    """``value`` if it is a usable vocabulary size (a positive int); else a DataError."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(f"{what} lacks a positive int 'vocab_size' (got {value!r}); {fix}")
    return value


def dtype_for(vocab_size: int) -> str:
    """``uint16`` while every id fits (vocab ≤ 65,536), else ``uint32``."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


class TokenFile:
    """One growing token file (``train.bin`` or ``val.bin``) written under a temporary name."""

    def __init__(self, path: Path, split: str, dtype: str, vocab_size: int) -> None:
        self.path, self.split = path, split
        self.dtype, self.vocab_size = np.dtype(dtype), vocab_size
        self.tmp = temporary_name(path)
        self.count = 0
        self._file: BinaryIO | None = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish/abort

    def write(self, ids: np.ndarray | Sequence[int]) -> None:
        """Append token ids (checked against the vocabulary)."""
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(
                f"{self.split} ids for {self.path.parent} must be a 1-D integer array, got "
                f"shape {arr.shape} dtype {arr.dtype}; fix the preparer"
            )
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= self.vocab_size:
            raise DataError(
                f"{self.split} ids for {self.path.parent} span {low}..{high}, outside the "
                f"vocabulary 0..{self.vocab_size - 1}; fix the tokenizer or meta['vocab_size']"
            )
        assert self._file is not None
        self._file.write(arr.astype(self.dtype, copy=False).tobytes())
        self.count += int(arr.size)

    def finish(self) -> None:
        """Flush and fsync the temporary file (the rename comes later, in ``commit``)."""
        assert self._file is not None
        sync_and_close(self._file)
        self._file = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp.unlink(missing_ok=True)


class ArtifactWriter:
    """Writes ``train.bin``, ``val.bin`` and ``meta.pkl`` atomically, tokens streamed in.

    ``with ArtifactWriter(out_dir, vocab_size) as w: w.train.write(ids); ...; w.commit(meta)``.
    Tokens go to temporary files that grow chunk by chunk; ``commit`` renames them into place
    and writes ``meta.pkl`` last. Leaving the block without ``commit`` (or with an error) removes
    the temporary files and leaves no artifact under a final name.
    """

    def __init__(self, out_dir: Path, vocab_size: object) -> None:
        self.out_dir = Path(out_dir)
        self.vocab_size = check_vocab_size(
            vocab_size, f"meta for {self.out_dir}", "fix the preparer"
        )
        self.dtype = dtype_for(self.vocab_size)
        self._files: list[TokenFile] = []

    def __enter__(self) -> ArtifactWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.train = TokenFile(self.out_dir / TRAIN_FILE, "train", self.dtype, self.vocab_size)
        self._files.append(self.train)
        self.val = TokenFile(self.out_dir / VAL_FILE, "val", self.dtype, self.vocab_size)
        self._files.append(self.val)
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files:
            f.abort()

    def commit(self, meta: dict) -> dict:
        """Check the sizes, rename both token files into place, then write ``meta.pkl``."""
        if meta.get("vocab_size") != self.vocab_size:
            raise DataError(
                f"meta for {self.out_dir} says vocab_size {meta.get('vocab_size')!r} but the "
                f"tokens were written for {self.vocab_size}; fix the preparer"
            )
        for f in self._files:
            if f.count < MIN_SPLIT_TOKENS:
                raise DataError(
                    f"corpus too short: the {f.split} split for {self.out_dir} has {f.count} "
                    f"tokens (need at least {MIN_SPLIT_TOKENS}); use a longer corpus or change "
                    "prepare.val_fraction"
                )
        full = {
            **meta,
            "format_version": META_FORMAT_VERSION,
            "dtype": self.dtype,
            "train_tokens": self.train.count,
            "val_tokens": self.val.count,
        }
        payload = _plain_payload(full, self.out_dir)
        for f in self._files:
            f.finish()
        # Every check passed and the new tokens are on disk: only now drop the old "complete"
        # marker, so a crash between the renames never pairs old meta with new bins, and a
        # failure before this point leaves the earlier artifacts as they were.
        (self.out_dir / META_FILE).unlink(missing_ok=True)
        fsync_dir(self.out_dir)
        for f in self._files:
            os.replace(f.tmp, f.path)
        fsync_dir(self.out_dir)
        write_atomic(self.out_dir / META_FILE, payload)
        self._files.clear()
        return full


def _plain_payload(meta: dict, out_dir: Path) -> bytes:
    payload = pickle.dumps(meta)
    try:
        _loads_plain(payload)
    except DataError as e:
        raise DataError(f"cannot write {out_dir / META_FILE}: {e}") from None
    return payload


def write_bin_and_meta(
    out_dir: Path,
    train_ids: np.ndarray | Sequence[int],
    val_ids: np.ndarray | Sequence[int],
    meta: dict,
) -> dict:
    """Write given token ids as ``train.bin`` and ``val.bin``, then ``meta.pkl``; return the meta.

    The in-memory face of :class:`ArtifactWriter`, which checks and writes everything.
    """
    with ArtifactWriter(Path(out_dir), meta.get("vocab_size")) as writer:
        writer.train.write(train_ids)
        writer.val.write(val_ids)
        return writer.commit(meta)


def read_meta(path: Path) -> dict:
    """Read ``meta.pkl`` safely (plain data only); nanoGPT's three-key meta gets defaults."""
    path = Path(path)
    hint = "run `ml-playground prepare` (with --force) to rebuild it"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; {hint}") from None
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    try:
        meta = _loads_plain(data)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except Exception as e:
        raise DataError(
            f"{path} is not a readable pickle ({type(e).__name__}: {e}); {hint}"
        ) from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds a {type(meta).__name__}, not a dict; {hint}")
    check_vocab_size(meta.get("vocab_size"), str(path), hint)
    if "stoi" in meta:
        meta.setdefault("tokenizer", "char")
        meta.setdefault("encoding", None)
    meta.setdefault("dtype", "uint16")
    if meta["dtype"] not in _DTYPES:
        raise DataError(f"{path} names dtype {meta['dtype']!r}, not one of {_DTYPES}; {hint}")
    return meta


# nanoGPT's rule: a data folder without meta.pkl holds GPT-2 BPE ids (data/shakespeare,
# data/openwebtext), as uint16.
NANOGPT_DEFAULT_META = {
    "vocab_size": 50257,
    "tokenizer": "tiktoken",
    "encoding": "gpt2",
    "eot_token": 50256,
    "dtype": "uint16",
}


def is_nanogpt_gpt2_folder(dataset_dir: Path) -> bool:
    """A nanoGPT folder with ``train.bin`` and ``val.bin`` but no ``meta.pkl`` (GPT-2 BPE)."""
    dataset_dir = Path(dataset_dir)
    return not (dataset_dir / META_FILE).exists() and all(
        (dataset_dir / name).is_file() for name in (TRAIN_FILE, VAL_FILE)
    )


def dataset_meta(dataset_dir: Path) -> dict:
    """The meta of a dataset folder: its ``meta.pkl``, or GPT-2 BPE when nanoGPT left none."""
    dataset_dir = Path(dataset_dir)
    if is_nanogpt_gpt2_folder(dataset_dir):
        return dict(NANOGPT_DEFAULT_META)
    return read_meta(dataset_dir / META_FILE)


def _expected_bytes(meta: dict, key: str) -> int | None:
    count = meta.get(key)
    if not isinstance(count, int) or isinstance(count, bool):
        return None
    return count * np.dtype(meta["dtype"]).itemsize


def check_token_counts(dataset_dir: Path, meta: dict) -> None:
    """Each token file's size against the token count and dtype ``meta`` records, from the
    sizes alone (nothing is read): a truncated file, swapped files or a file rewritten in
    another dtype would otherwise train. Counts a meta does not record (nanoGPT's) are not
    checked."""
    dataset_dir = Path(dataset_dir)
    splits = ((TRAIN_FILE, "train_tokens"), (VAL_FILE, "val_tokens"))
    expected = {name: _expected_bytes(meta, key) for name, key in splits}
    for (name, key), (other, _) in zip(splits, reversed(splits), strict=True):
        path, want = dataset_dir / name, expected[name]
        size = path.stat().st_size
        if want is None or size == want:
            continue
        dtype = meta["dtype"]
        other_dtype = "uint32" if dtype == "uint16" else "uint16"
        if size == expected[other]:
            why = f"the size recorded for {other}: {TRAIN_FILE} and {VAL_FILE} look swapped"
        elif size == meta[key] * np.dtype(other_dtype).itemsize:
            why = f"as many tokens in {other_dtype}: it was written in another dtype"
        else:
            why = "truncated or replaced" if size < want else "appended to or replaced"
        raise DataError(
            f"{path}: meta.pkl records {meta[key]:,} tokens of {dtype} ({want:,} bytes) but "
            f"the file holds {size:,} bytes ({why}); rebuild the dataset with "
            "`ml-playground prepare --force`"
        )


def artifacts_ready(dataset_dir: Path) -> bool:
    """True when ``train.bin``, ``val.bin`` and a readable ``meta.pkl`` agree with each other."""
    dataset_dir = Path(dataset_dir)
    try:
        meta = read_meta(dataset_dir / META_FILE)
        if not all((dataset_dir / name).is_file() for name in (TRAIN_FILE, VAL_FILE)):
            return False
        check_token_counts(dataset_dir, meta)
    except DataError:
        return False
    return True


def load_tokens(path: Path, dtype: str) -> np.memmap:
    """Memory-map a token file read-only after checking it exists and fits ``dtype``."""
    path = Path(path)
    try:
        np_dtype = np.dtype(dtype)
    except TypeError:
        raise DataError(
            f"unknown token dtype {dtype!r} for {path}; expected one of {_DTYPES}"
        ) from None
    if not path.is_file():
        raise DataError(f"token file {path} does not exist; run `ml-playground prepare` first")
    size = path.stat().st_size
    if size == 0:
        raise DataError(
            f"token file {path} is empty; rebuild it with `ml-playground prepare --force`"
        )
    if size % np_dtype.itemsize:
        raise DataError(
            f"token file {path} has {size} bytes, not a multiple of {np_dtype.itemsize} "
            f"({dtype}); rebuild it with `ml-playground prepare --force`"
        )
    return np.memmap(path, dtype=np_dtype, mode="r")
