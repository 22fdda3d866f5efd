"""Tests for dataset preparation: tokenizers, artifacts, safe meta loading, fetch, run_prepare."""

from __future__ import annotations

import builtins
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from pydantic import ValidationError

from ml_playground.configuration.loading import packaged_defaults
from ml_playground.errors import ConfigError, DataError, SamplingError
from ml_playground.prepare import (
    CharTokenizer,
    PrepareConfig,
    TiktokenTokenizer,
    artifacts_ready,
    cache_dir,
    cached_path_for,
    fetch,
    load_tokens,
    prepare_corpus,
    read_meta,
    run_prepare,
    tokenizer_from_meta,
    write_bin_and_meta,
)
from ml_playground.prepare.artifacts import check_token_counts

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare/input.txt"
TIKTOKEN_CACHE = SHAKESPEARE.parents[1] / "tiktoken_cache"
CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3


def tiny_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="tiny_bytes",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={"<|endoftext|>": 256},
    )


def settings(source: Path | str, **changes: object) -> PrepareConfig:
    """The packaged [prepare] defaults for ``source``, no checksum, with ``changes``."""
    values = {**packaged_defaults()["prepare"], "source": str(source), "source_sha256": ""}
    return PrepareConfig(**{**values, **changes})


def _write_corpus(tmp_path: Path, text: str = CORPUS) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


# --- tokenizers ---------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_nanogpt_meta() -> None:
    chars = sorted(set(CORPUS))
    tok = CharTokenizer(chars)
    assert tok.decode(tok.encode(CORPUS)) == CORPUS
    meta = tok.meta()
    # Exactly what nanoGPT's shakespeare_char/prepare.py stores, plus our two keys.
    assert meta["vocab_size"] == len(chars)
    assert meta["stoi"] == {ch: i for i, ch in enumerate(chars)}
    assert meta["itos"] == {i: ch for i, ch in enumerate(chars)}
    assert meta["tokenizer"] == "char"
    assert meta["encoding"] is None
    assert set(meta) == {"vocab_size", "itos", "stoi", "tokenizer", "encoding"}
    rebuilt = tokenizer_from_meta({k: meta[k] for k in ("vocab_size", "itos", "stoi")})
    assert rebuilt.encode("hear me") == tok.encode("hear me")


def test_char_tokenizer_unknown_character() -> None:
    tok = CharTokenizer(["a", "b", "c"])
    with pytest.raises(SamplingError, match=r"'z'.*vocabulary"):
        tok.encode("abz")
    with pytest.raises(SamplingError, match="outside"):
        tok.decode([0, 7])


def test_tiktoken_tokenizer_with_tiny_encoding() -> None:
    tok = TiktokenTokenizer(tiny_encoding())
    text = "hello world <|endoftext|>"
    ids = tok.encode(text)
    assert ids == list(text.encode())  # special token text is encoded as ordinary bytes
    assert tok.decode(ids) == text
    assert tok.vocab_size == 257
    assert tok.meta() == {
        "vocab_size": 257,
        "tokenizer": "tiktoken",
        "encoding": "tiny_bytes",
        "eot_token": 256,
    }
    with pytest.raises(SamplingError):
        tok.decode([1000])


def test_unknown_tiktoken_encoding_is_a_configuration_error() -> None:
    known = r"one of tiktoken's encodings \(gpt2, r50k_base, .*cl100k_base.*\) or char"
    with pytest.raises(ValidationError, match=rf"unknown tiktoken encoding 'nope'; use .*{known}"):
        settings("c.txt", tokenizer="tiktoken:nope")  # found with the config, nothing built
    with pytest.raises(ConfigError, match=r"^prepare\.tokenizer: unknown tiktoken encoding 'nope'"):
        TiktokenTokenizer("nope")
    # From meta.pkl it is the data that is wrong, not a setting.
    with pytest.raises(DataError, match=r"meta\.pkl names tokenizer 'tiktoken' but no encoding"):
        tokenizer_from_meta({"vocab_size": 3, "tokenizer": "tiktoken", "encoding": "nope"})


def test_prepare_corpus_with_tiny_tiktoken(tmp_path: Path) -> None:
    source = _write_corpus(tmp_path)
    tok = TiktokenTokenizer(tiny_encoding())
    meta = prepare_corpus([source], tok, tmp_path / "ds", settings(source), seed=0)
    cut = int(len(CORPUS) * 0.9)
    assert meta["dtype"] == "uint16"
    assert load_tokens(tmp_path / "ds" / "train.bin", "uint16").tolist() == list(
        CORPUS[:cut].encode()
    )
    assert meta["val_tokens"] == len(CORPUS) - cut


# --- the [prepare] section: each rule is checked here, once -------------------------------


def test_prepare_config_rules() -> None:
    for spec in ("char", "tiktoken:gpt2", "hf:gpt2", "hf:tok/tokenizer.json", "bpe:512"):
        assert settings("c.txt", tokenizer=spec).tokenizer == spec
    assert settings("c.txt", source_sha256="A" * 64).source_sha256 == "a" * 64  # any case
    bad: list[dict[str, object]] = [
        *({"tokenizer": spec} for spec in ("bpe", "tiktoken", "tiktoken:", "Char", "hf:")),
        *({"tokenizer": spec} for spec in ("bpe:256", "bpe:x", f"bpe:{2**20 + 1}")),
        *({"val_fraction": v} for v in (0.0, 1.0, -0.1)),
        *({"source_sha256": v} for v in ("abc", "g" * 64)),
        {"split": "random"},
        {"chunk_bytes": 0},
        {"num_threads": -1},
    ]
    for change in bad:
        with pytest.raises(ValidationError, match=next(iter(change))):
            settings("c.txt", **change)


def test_tokenizer_from_meta_rejects_unknown_kind() -> None:
    with pytest.raises(DataError, match="unknown tokenizer"):
        tokenizer_from_meta({"vocab_size": 3})
    with pytest.raises(DataError, match="vocab_size"):
        tokenizer_from_meta({"vocab_size": 3, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": 1}})


# --- artifacts ----------------------------------------------------------------------------


def test_write_bin_and_meta_uint16(tmp_path: Path) -> None:
    out = tmp_path / "ds" / "nested"
    train, val = np.array([0, 1, 2, 64, 3]), np.array([5, 6])
    meta = write_bin_and_meta(out, train, val, {"vocab_size": 65, "tokenizer": "char"})
    assert sorted(p.name for p in out.iterdir()) == ["meta.pkl", "train.bin", "val.bin"]
    assert meta["dtype"] == "uint16" and meta["format_version"] == 1
    assert (meta["train_tokens"], meta["val_tokens"]) == (5, 2)
    assert read_meta(out / "meta.pkl") == meta
    assert np.fromfile(out / "train.bin", dtype=np.uint16).tolist() == train.tolist()
    assert load_tokens(out / "val.bin", "uint16").tolist() == [5, 6]
    assert artifacts_ready(out)


def test_write_bin_and_meta_uint32(tmp_path: Path) -> None:
    train, val = np.array([0, 69_999, 65_536]), np.array([1, 2])
    meta = write_bin_and_meta(tmp_path, train, val, {"vocab_size": 70_000})
    assert meta["dtype"] == "uint32"
    assert (tmp_path / "train.bin").stat().st_size == 12
    assert load_tokens(tmp_path / "train.bin", "uint32").tolist() == train.tolist()


def test_write_bin_and_meta_rejects_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="outside the vocabulary"):
        write_bin_and_meta(tmp_path, np.array([0, 65]), np.array([1, 2]), {"vocab_size": 65})
    with pytest.raises(DataError, match="too short"):
        write_bin_and_meta(tmp_path, np.array([0, 1]), np.array([1]), {"vocab_size": 65})
    with pytest.raises(DataError, match="plain Python data"):
        write_bin_and_meta(
            tmp_path, np.array([0, 1]), np.array([1, 2]), {"vocab_size": 9, "x": Path()}
        )
    assert list(tmp_path.iterdir()) == []


def test_artifacts_ready_detects_mismatch(tmp_path: Path) -> None:
    assert not artifacts_ready(tmp_path)
    write_bin_and_meta(tmp_path, np.arange(10), np.arange(4), {"vocab_size": 10})
    assert artifacts_ready(tmp_path)
    with open(tmp_path / "val.bin", "ab") as f:
        f.write(b"\0\0")
    assert not artifacts_ready(tmp_path)
    (tmp_path / "val.bin").unlink()
    assert not artifacts_ready(tmp_path)


def test_check_token_counts_checks_what_meta_records(tmp_path: Path) -> None:
    meta = write_bin_and_meta(tmp_path, np.arange(10), np.arange(4), {"vocab_size": 10})
    check_token_counts(tmp_path, meta)
    np.arange(8, dtype=np.uint16).tofile(tmp_path / "train.bin")  # 16 bytes: whole tokens
    with pytest.raises(DataError) as info:
        check_token_counts(tmp_path, meta)
    assert str(info.value).startswith(
        f"{tmp_path / 'train.bin'}: meta.pkl records 10 tokens of uint16 (20 bytes) but the "
        "file holds 16 bytes (truncated or replaced); rebuild the dataset with "
        "`ml-playground prepare --force`"
    )
    # nanoGPT's meta.pkl records no counts: nothing to hold the sizes against.
    check_token_counts(tmp_path, {"vocab_size": 10, "dtype": "uint16"})


def test_read_meta_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple:
            return (builtins.exec, (f"open({str(marker)!r}, 'w').close()",))

    path = tmp_path / "meta.pkl"
    path.write_bytes(pickle.dumps({"vocab_size": 3, "x": Evil()}))
    with pytest.raises(DataError, match="refusing to load"):
        read_meta(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the file really would have run code
    assert marker.exists()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (pickle.dumps([1, 2]), "not a dict"),
        (pickle.dumps({"itos": {}}), "vocab_size"),
        (pickle.dumps({"vocab_size": "65"}), "vocab_size"),
        (pickle.dumps({"vocab_size": 65, "stoi": {"a": 0}})[:-5], "not a readable pickle"),
        (b"hello world", "not a readable pickle"),
    ],
)
def test_read_meta_errors(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "meta.pkl"
    path.write_bytes(payload)
    with pytest.raises(DataError, match=message):
        read_meta(path)


def test_read_meta_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_meta(tmp_path / "meta.pkl")


def test_read_meta_accepts_nanogpt_three_key_meta(tmp_path: Path) -> None:
    chars = sorted(set("hello"))
    nanogpt = {
        "vocab_size": len(chars),
        "itos": dict(enumerate(chars)),
        "stoi": {ch: i for i, ch in enumerate(chars)},
    }
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(nanogpt))
    np.array([0, 1, 2], dtype=np.uint16).tofile(tmp_path / "train.bin")
    np.array([3, 0], dtype=np.uint16).tofile(tmp_path / "val.bin")
    meta = read_meta(tmp_path / "meta.pkl")
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16"
    assert artifacts_ready(tmp_path)
    assert tokenizer_from_meta(meta).decode([1, 0]) == "he"


def test_load_tokens_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_tokens(tmp_path / "train.bin", "uint16")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_tokens(tmp_path / "empty.bin", "uint16")
    (tmp_path / "odd.bin").write_bytes(b"\0\0\0")
    with pytest.raises(DataError, match="multiple of 2"):
        load_tokens(tmp_path / "odd.bin", "uint16")


# --- fetch --------------------------------------------------------------------------------


def test_fetch_local_file_and_sha(tmp_path: Path) -> None:
    path = _write_corpus(tmp_path)
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    assert fetch(str(path), good) == path
    assert fetch(path, None) == path
    with pytest.raises(DataError, match=f"expected {'0' * 64}, got {good}"):
        fetch(path, "0" * 64)
    with pytest.raises(DataError, match="does not exist"):
        fetch(tmp_path / "missing.txt", None)


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ML_PLAYGROUND_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ml-playground"
    monkeypatch.setenv("ML_PLAYGROUND_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_fetch_unreachable_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ML_PLAYGROUND_CACHE", str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/x.txt"
    with pytest.raises(DataError, match=r"could not download http://127\.0\.0\.1:9/x\.txt") as e:
        fetch(url, None, timeout=5)
    assert str(cached_path_for(url)) in str(e.value)
    assert not cached_path_for(url).exists()
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_fetch_uses_seeded_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ML_PLAYGROUND_CACHE", str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/corpus.txt"
    cached = cached_path_for(url)
    assert cached.is_relative_to(tmp_path / "cache") and cached.name == "corpus.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text(CORPUS, encoding="utf-8")
    digest = hashlib.sha256(CORPUS.encode()).hexdigest()
    assert fetch(url, digest) == cached
    with pytest.raises(DataError, match="sha256 mismatch"):
        fetch(url, "f" * 64)


# --- run_prepare --------------------------------------------------------------------------


def test_run_prepare_split_skip_and_force(tmp_path: Path) -> None:
    text = "abcdefghij" * 7 + "xyz"  # 73 chars
    source = _write_corpus(tmp_path, text)
    out = tmp_path / "ds"
    did, meta = run_prepare(settings(source), out, seed=0)
    assert did
    assert (meta["train_tokens"], meta["val_tokens"]) == (65, 8)  # int(73 * 0.9) = 65
    assert meta["vocab_size"] == 13
    tok = tokenizer_from_meta(read_meta(out / "meta.pkl"))
    assert tok.decode(load_tokens(out / "val.bin", meta["dtype"]).tolist()) == text[65:]

    did, again = run_prepare(settings(source), out, seed=0)
    assert not did and again == meta
    with pytest.raises(
        DataError, match=r"'char' but prepare\.tokenizer is 'tiktoken:gpt2'; pass --force"
    ):
        run_prepare(settings(source, tokenizer="tiktoken:gpt2"), out, seed=0)

    source.write_text(text * 2, encoding="utf-8")
    did, meta = run_prepare(settings(source, val_fraction=0.5), out, seed=0, force=True)
    assert did and (meta["train_tokens"], meta["val_tokens"]) == (73, 73)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"abc", "too short"), (b"ab\xffcd" * 10, "not valid UTF-8")],
)
def test_run_prepare_bad_corpus(tmp_path: Path, content: bytes, message: str) -> None:
    source = tmp_path / "corpus.txt"
    source.write_bytes(content)
    with pytest.raises(DataError, match=message):
        run_prepare(settings(source), tmp_path / "ds", seed=0)
    assert not (tmp_path / "ds" / "meta.pkl").exists()


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} not present")
def test_prepare_real_tinyshakespeare(tmp_path: Path) -> None:
    sha256 = packaged_defaults()["prepare"]["source_sha256"]  # the default corpus's checksum
    did, meta = run_prepare(settings(SHAKESPEARE, source_sha256=sha256), tmp_path, seed=0)
    assert did
    assert meta["vocab_size"] == 65
    assert meta["train_tokens"] == 1_003_854
    assert meta["val_tokens"] == 111_540
    assert (tmp_path / "train.bin").stat().st_size == 1_003_854 * 2


@pytest.mark.skipif(
    not (SHAKESPEARE.is_file() and TIKTOKEN_CACHE.is_dir()), reason="no shared data"
)
def test_prepare_real_tinyshakespeare_gpt2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))
    did, meta = run_prepare(settings(SHAKESPEARE, tokenizer="tiktoken:gpt2"), tmp_path, seed=0)
    assert did and meta["vocab_size"] == 50257 and meta["eot_token"] == 50256
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)  # nanoGPT's counts


def test_failed_forced_prepare_leaves_the_earlier_artifacts_whole(tmp_path: Path) -> None:
    """`prepare --force` on a bad corpus fails before touching the prepared folder: meta.pkl
    stays (without it the folder would read as nanoGPT's GPT-2 layout)."""
    source = _write_corpus(tmp_path, "abcdefghij" * 20)
    out = tmp_path / "ds"
    _, meta = run_prepare(settings(source), out, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    source.write_text("ab", encoding="utf-8")
    with pytest.raises(DataError, match="too short"):
        run_prepare(settings(source), out, seed=0, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert read_meta(out / "meta.pkl") == meta
