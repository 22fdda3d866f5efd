"""Dataset artifacts: ``train.bin`` / ``val.bin`` (flat token ids, nanoGPT layout) and ``meta.pkl``.

Everything is written atomically (temp file, fsync, rename); ``meta.pkl`` is written last.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from ml_playground.errors import ConfigError, DataError

if TYPE_CHECKING:
    from ml_playground.prepare.tokenizers import Tokenizer

META_FORMAT_VERSION = 1
TRAIN_FILE = "train.bin"
VAL_FILE = "val.bin"
META_FILE = "meta.pkl"
MIN_SPLIT_TOKENS = 2  # one (input, target) pair
_DTYPES = ("uint16", "uint32")


def _atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Make the rename itself durable; not possible on every platform/filesystem.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


class _PlainDataUnpickler(pickle.Unpickler):
    """Admits only what pickle builds without importing anything: plain containers and scalars."""

    def find_class(self, module: str, name: str) -> Any:
        raise DataError(
            f"meta.pkl references {module}.{name}; refusing to load: "
            "meta.pkl may only hold plain Python data"
        )


def _loads_plain(data: bytes) -> Any:
    return _PlainDataUnpickler(io.BytesIO(data)).load()


def _as_ids(ids: np.ndarray, split: str, vocab_size: int, out_dir: Path) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise DataError(
            f"{split} ids for {out_dir} must be a 1-D integer array, got shape {arr.shape} "
            f"dtype {arr.dtype}; fix the preparer"
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        raise DataError(
            f"{split} ids for {out_dir} span {int(arr.min())}..{int(arr.max())}, outside the "
            f"vocabulary 0..{vocab_size - 1}; fix the tokenizer or meta['vocab_size']"
        )
    if arr.size < MIN_SPLIT_TOKENS:
        raise DataError(
            f"corpus too short: the {split} split for {out_dir} has {arr.size} tokens (need at "
            f"least {MIN_SPLIT_TOKENS}); use a longer corpus or change prepare.val_fraction"
        )
    return arr


def write_bin_and_meta(
    out_dir: Path, train_ids: np.ndarray, val_ids: np.ndarray, meta: dict
) -> dict:
    """Write ``train.bin``, ``val.bin`` and then ``meta.pkl`` into ``out_dir``; return the meta."""
    out_dir = Path(out_dir)
    vocab_size = meta.get("vocab_size")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise DataError(
            f"meta for {out_dir} needs a positive int 'vocab_size', got {vocab_size!r}; "
            "fix the preparer"
        )
    train = _as_ids(train_ids, "train", vocab_size, out_dir)
    val = _as_ids(val_ids, "val", vocab_size, out_dir)
    dtype = "uint16" if vocab_size <= 2**16 else "uint32"
    full = {
        **meta,
        "format_version": META_FORMAT_VERSION,
        "dtype": dtype,
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
    }
    payload = pickle.dumps(full)
    try:
        _loads_plain(payload)
    except DataError as e:
        raise DataError(f"cannot write {out_dir / META_FILE}: {e}") from None

    out_dir.mkdir(parents=True, exist_ok=True)
    # Drop the "complete" marker first so a crash below never pairs old meta with new bins.
    (out_dir / META_FILE).unlink(missing_ok=True)
    _atomic_write(out_dir / TRAIN_FILE, train.astype(dtype, copy=False).tofile)
    _atomic_write(out_dir / VAL_FILE, val.astype(dtype, copy=False).tofile)
    _atomic_write(out_dir / META_FILE, lambda f: f.write(payload))
    return full


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
    vocab_size = meta.get("vocab_size")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 1:
        raise DataError(f"{path} lacks a positive int 'vocab_size' (got {vocab_size!r}); {hint}")
    if "stoi" in meta:
        meta.setdefault("tokenizer", "char")
        meta.setdefault("encoding", None)
    meta.setdefault("dtype", "uint16")
    if meta["dtype"] not in _DTYPES:
        raise DataError(f"{path} names dtype {meta['dtype']!r}, not one of {_DTYPES}; {hint}")
    return meta


def _expected_bytes(meta: dict, key: str) -> int | None:
    count = meta.get(key)
    if not isinstance(count, int) or isinstance(count, bool):
        return None
    return count * np.dtype(meta["dtype"]).itemsize


def artifacts_ready(dataset_dir: Path) -> bool:
    """True when ``train.bin``, ``val.bin`` and a readable ``meta.pkl`` agree with each other."""
    dataset_dir = Path(dataset_dir)
    try:
        meta = read_meta(dataset_dir / META_FILE)
    except DataError:
        return False
    for name, key in ((TRAIN_FILE, "train_tokens"), (VAL_FILE, "val_tokens")):
        path = dataset_dir / name
        if not path.is_file():
            return False
        expected = _expected_bytes(meta, key)
        if expected is not None and path.stat().st_size != expected:
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


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split like nanoGPT: the first ``int(n * (1 - val_fraction))`` characters train."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"prepare.val_fraction must be between 0 and 1, got {val_fraction}")
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:]


def prepare_text(
    text: str, tokenizer: Tokenizer, out_dir: Path, val_fraction: float, *, source: str = "corpus"
) -> dict:
    """Split ``text``, encode both parts with ``tokenizer`` and write the artifacts."""
    if not text:
        raise DataError(f"{source} is empty; give a non-empty UTF-8 text corpus")
    train_text, val_text = split_text(text, val_fraction)
    train = np.asarray(tokenizer.encode(train_text), dtype=np.int64)
    val = np.asarray(tokenizer.encode(val_text), dtype=np.int64)
    if min(train.size, val.size) < MIN_SPLIT_TOKENS:
        raise DataError(
            f"corpus too short: {source} gives {train.size} train and {val.size} val tokens "
            f"(need at least {MIN_SPLIT_TOKENS} each); use a longer corpus or change "
            "prepare.val_fraction"
        )
    return write_bin_and_meta(out_dir, train, val, tokenizer.meta())
